"""ChatGLM2's [Round N] rows and ChatGLM3's role-token conversations: features of ADGEN, history and tool rows,
and the one truncation rule (oldest whole turns first, the current query cut only when it alone does not fit)."""

from __future__ import annotations

import json

import pytest

from ptuning.models.base import IGNORE_INDEX, Conversation, conversation_from_messages
from ptuning.models.chatglm2.template import (
    TOOL_DEFINITION_PREFIX,
    ChatGLM2Template,
    ChatGLM3Template,
    tool_call_text,
)
from ptuning.models.chatglm2.tokenizer import ChatGLM2Tokenizer

from .common import ROOT

ADGEN = {"content": "类型#上衣*材质#棉*颜色#白色", "summary": "这件白色纯棉毛衣，值得入手。"}


@pytest.fixture(scope="module")
def glm2():
    return ChatGLM2Template(ChatGLM2Tokenizer.from_pretrained(ROOT / "data" / "tokenizer-chatglm2"))


@pytest.fixture(scope="module")
def glm3():
    return ChatGLM3Template(ChatGLM2Tokenizer.from_pretrained(ROOT / "data" / "tokenizer-chatglm3"))


def targets(row) -> list[int]:
    return [label for label in row.labels if label != IGNORE_INDEX]


# ---- ChatGLM2 ----


def test_chatglm2_adgen_row(glm2):
    tok = glm2.tokenizer
    row = glm2.train_row(Conversation(ADGEN["content"]), ADGEN["summary"], 64, 128)
    prompt = [1001, 1003, *tok.sp_encode(f"[Round 1]\n\n问：{ADGEN['content']}\n\n答：")]
    answer = tok.sp_encode(ADGEN["summary"])
    assert row.input_ids == prompt + answer + [2]
    assert row.labels == [IGNORE_INDEX] * len(prompt) + answer + [2]
    assert (row.dropped_turns, row.truncated_tokens) == (0, 0)
    assert glm2.prompt(Conversation(ADGEN["content"]), 64).ids == prompt
    assert glm2.generation_budget(64) == 64 and glm2.stop_token_ids == [2]
    assert glm2.decode(answer + [2, 0]) == ADGEN["summary"]


def test_chatglm2_response_cut_to_max_target_length(glm2):
    row = glm2.train_row(Conversation("q"), ADGEN["summary"], 64, 3)
    assert targets(row) == glm2.tokenizer.sp_encode(ADGEN["summary"])[:3] + [2]
    # counted, so that training can say how many responses were cut
    assert row.truncated_answer_tokens == len(glm2.tokenizer.sp_encode(ADGEN["summary"])) - 3 > 0
    assert glm2.train_row(Conversation("q"), ADGEN["summary"], 64, 128).truncated_answer_tokens == 0


def test_chatglm2_history_rows(glm2):
    tok = glm2.tokenizer
    conv = Conversation("毛衣呢？", history=[("白色好看吗", "好看"), ("棉的吗", "是的")])
    text = "[Round 1]\n\n问：白色好看吗\n\n答：好看\n\n[Round 2]\n\n问：棉的吗\n\n答：是的\n\n[Round 3]\n\n问：毛衣呢？\n\n答："
    full = [1001, 1003, *tok.sp_encode(text)]
    assert glm2.prompt(conv, 200).ids == full
    # too long for both turns: the oldest goes first, the rounds are numbered again from 1
    shorter = [1001, 1003, *tok.sp_encode("[Round 1]\n\n问：棉的吗\n\n答：是的\n\n[Round 2]\n\n问：毛衣呢？\n\n答：")]
    out = glm2.prompt(conv, len(full) - 1)
    assert (out.ids, out.dropped_turns, out.truncated_tokens) == (shorter, 1, 0)
    alone = [1001, 1003, *tok.sp_encode("[Round 1]\n\n问：毛衣呢？\n\n答：")]
    out = glm2.prompt(conv, len(alone))
    assert (out.ids, out.dropped_turns) == (alone, 2)


def test_chatglm2_long_query_is_cut_keeping_its_start_and_the_frame(glm2):
    tok = glm2.tokenizer
    query = "这件白色纯棉毛衣，七分袖露出手腕，文艺气息浓厚。" * 4
    full = glm2.prompt(Conversation(query), 10_000).ids
    out = glm2.prompt(Conversation(query, history=[("a", "b")]), 30)
    assert len(out.ids) <= 30 and out.dropped_turns == 1
    assert out.truncated_tokens == len(full) - len(out.ids) > 0
    assert out.ids[:2] == [1001, 1003]
    text = tok.decode(out.ids, skip_special_tokens=True)  # the query's start stays, 答： after it
    assert text.startswith("[Round 1]\n\n问：这件白色纯棉毛衣") and text.endswith("\n\n答：")
    assert "文艺气息浓厚。\n\n答：" not in text
    with pytest.raises(ValueError, match="budget of 5"):
        glm2.prompt(Conversation(query, history=[("a", "b")]), 5)
    # without history the first tokens stay, as the original's tokenizer truncation
    alone = glm2.prompt(Conversation(query), 30)
    assert alone.ids == full[:30] and alone.truncated_tokens == len(full) - 30


def test_chatglm2_source_prefix_goes_in_front_of_the_prompt(glm2):
    ids = glm2.prompt(Conversation("毛衣", source_prefix="广告："), 100).ids
    assert ids == [1001, 1003, *glm2.tokenizer.sp_encode("广告：[Round 1]\n\n问：毛衣\n\n答：")]
    assert glm2.render_text(Conversation("毛衣", source_prefix="广告：")) == "广告：[Round 1]\n\n问：毛衣\n\n答："


def test_chatglm2_system_and_tool_turns(glm2):
    with_system = glm2.prompt(Conversation("毛衣", system="你是导购"), 100).ids
    assert with_system == glm2.prompt(Conversation("你是导购\n毛衣"), 100).ids
    with pytest.raises(ValueError, match="ChatGLM3"):
        glm2.prompt(Conversation("q", extra=[{"role": "observation", "content": "x"}]), 100)


# ---- ChatGLM3 ----


def test_chatglm3_adgen_row(glm3):
    tok = glm3.tokenizer
    nl = tok.sp_encode("\n")
    row = glm3.train_row(Conversation(ADGEN["content"]), ADGEN["summary"], 64, 128)
    prompt = [1001, 1003, 1006, *nl, *tok.sp_encode(ADGEN["content"]), 1007]
    answer = nl + tok.sp_encode(ADGEN["summary"])
    assert row.input_ids == prompt + answer + [2]
    assert row.truncated_answer_tokens == 0
    short = glm3.train_row(Conversation(ADGEN["content"]), ADGEN["summary"], 64, 2)
    assert short.truncated_answer_tokens == len(tok.sp_encode(ADGEN["summary"])) - 2 > 0
    # the original's labels: a token is a target when the token before it is in an assistant message
    assert row.labels == [IGNORE_INDEX] * len(prompt) + answer + [2]
    assert glm3.prompt(Conversation(ADGEN["content"]), 64).ids == prompt
    assert glm3.generation_budget(64) == 65
    assert glm3.stop_token_ids == [2, 1006, 1008]
    assert glm3.decode(answer + [2]) == ADGEN["summary"]


def test_chatglm3_history_loss_on_every_assistant_turn(glm3):
    tok = glm3.tokenizer
    nl = tok.sp_encode("\n")
    conv = Conversation("毛衣呢？", history=[("白色好看吗", "好看")], system="你是导购")
    row = glm3.train_row(conv, "是的", 100, 100)
    system = [1005, *nl, *tok.sp_encode("你是导购")]
    user1 = [1006, *nl, *tok.sp_encode("白色好看吗")]
    assistant1 = [1007, *nl, *tok.sp_encode("好看")]
    user2 = [1006, *nl, *tok.sp_encode("毛衣呢？")]
    answer = nl + tok.sp_encode("是的")
    ids = [1001, 1003, *system, *user1, *assistant1, *user2, 1007, *answer, 2]
    assert row.input_ids == ids
    # targets: the earlier answer's text and the <|user|> that ends it; the answer and eos; never <|assistant|>
    assert targets(row) == [*assistant1[1:], 1006, *answer, 2]
    assert 1007 not in targets(row)


def test_chatglm3_truncation_drops_oldest_turn_then_cuts_query(glm3):
    conv = Conversation("毛衣呢？" * 5, history=[("白色好看吗", "好看"), ("棉的吗", "是的")], system="你是导购")
    full = glm3.prompt(conv, 1000)
    out = glm3.prompt(conv, len(full.ids) - 1)
    assert out.dropped_turns == 1 and out.truncated_tokens == 0
    alone = glm3.prompt(Conversation(conv.query, system="你是导购"), 1000).ids
    out = glm3.prompt(conv, len(alone) - 3)
    assert (out.dropped_turns, out.truncated_tokens, len(out.ids)) == (2, 3, len(alone) - 3)
    # with history too the query keeps its start, <|assistant|> after it (the original evaluation kept the first
    # max_input_length ids); the same prompt as without history
    assert out.ids[-1] == alone[-1] and out.ids[:5] == alone[:5]
    query = glm3.tokenizer.sp_encode(conv.query)
    assert out.ids[out.ids.index(1006) + 3:-1] == query[:-3]
    short = glm3.prompt(Conversation(conv.query, system="你是导购"), len(alone) - 3)
    assert short.ids == out.ids and short.truncated_tokens == 3
    with pytest.raises(ValueError, match="budget of 4"):
        glm3.prompt(conv, 4)
    # a system message that alone is too long loses its end
    long_system = Conversation("毛衣", system="你是导购" * 30)
    out = glm3.prompt(long_system, 40)
    assert len(out.ids) == 40 and out.ids[2] == 1005 and out.truncated_tokens > 0
    assert out.ids[-1] == 1007 and glm3.tokenizer.sp_encode("毛衣") == out.ids[-1 - len(glm3.tokenizer.sp_encode("毛衣")):-1]


def test_chatglm3_tool_row(glm3):
    tok = glm3.tokenizer
    nl = tok.sp_encode("\n")
    messages = [
        {"role": "user", "content": "北京天气"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": {"temp": 3}},
        {"role": "assistant", "content": "北京3度"},
    ]
    tools = [{"name": "get_weather", "parameters": {"city": "string"}}]
    conv, answer = conversation_from_messages(messages, tools)
    assert answer == "北京3度" and conv.query == "北京天气" and conv.tools == tools and conv.system is None
    assert tool_call_text({"city": "北京"}) == "```python\ntool_call(city='北京')\n```"
    row = glm3.train_row(conv, answer, 1000, 100)
    definition = TOOL_DEFINITION_PREFIX + json.dumps(tools, indent=4, ensure_ascii=False)
    assert row.input_ids[2:3 + len(nl) + len(tok.sp_encode(definition))] == [1005, *nl, *tok.sp_encode(definition)]
    call = [1007, *tok.sp_encode("get_weather\n"), *tok.sp_encode(tool_call_text({"city": "北京"}))]
    observation = [1008, *nl, *tok.sp_encode('{"temp": 3}')]
    final = nl + tok.sp_encode("北京3度")
    start = row.input_ids.index(1006)
    assert row.input_ids[start:] == [1006, *nl, *tok.sp_encode("北京天气"), *call, *observation, 1007, *final, 2]
    # the call and the <|observation|> after it are targets; the observation's text is not
    assert targets(row) == [*call[1:], 1008, *final, 2]
    prompt = glm3.prompt(conv, 1000).ids
    assert prompt == row.input_ids[: len(row.input_ids) - len(final) - 1]


def test_chatglm3_conversation_layouts_refused(glm3):
    with pytest.raises(ValueError, match="assistant's answer"):
        conversation_from_messages([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="role 'robot'"):
        glm3.prompt(conversation_from_messages([{"role": "user", "content": "q"}, {"role": "robot", "content": "x"},
                                                {"role": "assistant", "content": "y"}])[0], 100)
    with pytest.raises(ValueError, match="ChatGLM3"):
        ChatGLM2Template(glm3.tokenizer).prompt(Conversation("q", tools=[{"name": "f"}]), 100)
    with pytest.raises(ValueError, match="alternate"):
        conversation_from_messages([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"},
                                    {"role": "assistant", "content": "z"}])
    with pytest.raises(ValueError, match="tool turns"):
        glm3.prompt(Conversation("q", extra=[{"role": "user", "content": "x"}]), 100)
    with pytest.raises(ValueError, match="ChatGLM3 tokenizer"):
        ChatGLM3Template(ChatGLM2Tokenizer.from_pretrained(ROOT / "data" / "tokenizer-chatglm2"))


def finetune_demo_evaluation_ids(tokenizer, query: str, max_input_length: int) -> list[int]:
    """What ChatGLM3's ``finetune_demo`` (``process_batch_eval``) generates from for a one-turn conversation:
    ``[gMASK] sop`` and the user message as ``build_single_message`` makes it, cut to its first
    ``max_input_length`` ids, then the answer message's ``<|assistant|>``."""
    ids = [tokenizer.gmask_token_id, tokenizer.sop_token_id, *tokenizer.build_single_message("user", "", query)]
    return ids[:max_input_length] + [tokenizer.glm_tokens["<|assistant|>"]]


@pytest.mark.parametrize("max_input_length", [12, 20, 40])
def test_an_over_long_question_keeps_its_start_as_chatglm3s_finetune_demo_cuts_it(glm3, max_input_length):
    query = "开头" + "这件白色纯棉毛衣，七分袖露出手腕。" * 6 + "结尾的问题"
    original = finetune_demo_evaluation_ids(glm3.tokenizer, query, max_input_length)
    ours = glm3.prompt(Conversation(query), glm3.generation_budget(max_input_length))
    assert ours.ids == original  # the original keeps the question's start: so does every family here
    frame = 2 + len(glm3.tokenizer.build_single_message("user", "", ""))  # [gMASK] sop <|user|> "\n"
    assert ours.truncated_tokens == len(glm3.tokenizer.sp_encode(query)) - (max_input_length - frame)
    # with earlier turns that had to go, the question is cut the same way
    with_history = glm3.prompt(Conversation(query, history=[("白色好看吗", "好看")]), glm3.generation_budget(max_input_length))
    assert with_history.ids == original and with_history.dropped_turns == 1
