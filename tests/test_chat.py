"""``python -m ptuning.chat``: multi-turn history with the training template, clear / exit, streaming that
prints multi-byte characters whole, stopping an answer early, fitting the model's context."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

from ptuning.build import base_model_name, load_model, load_tokenizer
from ptuning.chat import BOT_PREFIX, USER_PREFIX, ChatSession
from ptuning.checkpoint import export_original, prefix_metadata, save_checkpoint
from ptuning.config import ModelConfig
from ptuning.evaluation.generate import GenerationSettings
from ptuning.generation import Detokenizer
from ptuning.models.chatglm.template import ChatGLMTemplate, build_prompt

from .common import ROOT


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """In-process model runs of this module use one intra-op thread (see ``one_thread_module``)."""


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="module")
def model():
    return load_model(ModelConfig())


@pytest.fixture(scope="module")
def original_checkpoint(tmp_path_factory, model):
    """The model's (untrained) prefix saved as ours, then exported in the original P-Tuning v2 format."""
    base = tmp_path_factory.mktemp("chat")
    ours = save_checkpoint(
        base / "run", 1, model, prefix_metadata(model, base_model_name(ModelConfig()))
    )
    export_original(ours, base / "orig")
    (base / "orig" / "prefix_config.json").unlink()
    return base / "orig"


def test_two_turns_clear_and_exit_through_stdin(original_checkpoint):
    q1, q2, q3 = "类型#裙*颜色#黑色*裙型#百褶裙", "再写一段", "上衣，棉"
    stdin = f"{q1}\n{q2}\n\nclear\n{q3}\nexit\nnever read\n"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ptuning.chat",
            "--prefix-checkpoint",
            str(original_checkpoint),
            "--max-new-tokens",
            "24",
            "--show-prompt",
        ],
        input=stdin,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    prompts = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert [p["turn"] for p in prompts] == [0, 1, 2]  # the blank line is no turn; nothing after exit
    # an answer may hold newlines: it runs from the bot's label to the next input prompt
    answers = [a.strip() for a in re.findall(f"{BOT_PREFIX}(.*?)\n{USER_PREFIX}", proc.stdout, re.S)]
    assert len(answers) == 3
    # turn 1 carries turn 0 as history, in the template training and evaluation use
    assert prompts[0]["prompt"] == q1
    assert prompts[1]["prompt"] == build_prompt(q2, [(q1, answers[0])])
    assert prompts[1]["prompt"].startswith(
        f"[Round 0]\n问：{q1}\n答：{answers[0]}\n[Round 1]\n问：{q2}\n答："
    )
    # after clear the conversation starts over
    assert "(conversation cleared)" in proc.stdout
    assert prompts[2]["prompt"] == q3
    assert "never read" not in proc.stdout + proc.stderr
    assert f"prefix {original_checkpoint}" in proc.stdout


def test_incremental_decoding_prints_whole_characters(tokenizer):
    # 龘 and the emoji have no piece in the small vocabulary: they are spelled as 3 and 4 byte pieces
    text = "这条黑色龘裙😀，好 看\n的  A字裙"
    ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))
    assert len(ids) > 15
    decoder = Detokenizer(tokenizer, strip_leading=True)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) + decoder.finish() == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "龘" in pieces and "😀" in pieces  # each printed once, complete
    # an answer that ends inside a character (the model stopped after 2 of its 3 bytes) drops the remainder
    cut = Detokenizer(tokenizer, strip_leading=True)
    shown = [cut.push(i) for i in ids[:3]]
    assert shown == ["这条黑色", "", ""] and cut.finish() == "" and cut.text == "这条黑色"


def test_history_drops_oldest_turns_to_fit_the_context(tokenizer):
    session = ChatSession(SimpleNamespace(), ChatGLMTemplate(tokenizer), GenerationSettings(max_new_tokens=40), 120)
    session.history = [("类型#裙*颜色#黑色", "这条黑色裙子，值得入手。")] * 4
    prompt, ids, dropped, cut = session.prepare("再来一个")
    assert dropped > 0 and len(ids) <= 80 and cut == 0
    assert prompt == build_prompt("再来一个", session.history[dropped:])
    # a message that alone does not fit keeps its first tokens and its [Round 0] turn, as training does
    prompt, ids, dropped, cut = session.prepare("开头" + "裙" * 200)
    assert dropped == 4 and cut > 0 and len(ids) <= 80
    text = tokenizer.decode(ids[:-2])
    assert text.startswith("[Round 0]\n问：开头裙") and text.endswith("裙\n答：")
    from ptuning.config import ConfigError

    with pytest.raises(ConfigError, match="--max-new-tokens=118: the model has 120 positions for the prompt and the "
                                          "answer together; expected at most 112"):
        ChatSession(SimpleNamespace(), ChatGLMTemplate(tokenizer), GenerationSettings(max_new_tokens=118), 120).prepare("a")


def test_stopping_an_answer_early_ends_generation_and_keeps_no_history(model, tokenizer):
    session = ChatSession(model, ChatGLMTemplate(tokenizer), GenerationSettings(max_new_tokens=400), 2048)
    before = threading.active_count()
    prompt, ids, _, _ = session.prepare("类型#裙*颜色#黑色")
    answer = session.reply("类型#裙*颜色#黑色", ids)
    next(answer)
    answer.close()
    assert threading.active_count() == before  # the generation thread stopped and was joined
    assert session.history == []
    full = "".join(session.reply("类型#裙*颜色#黑色", ids))
    assert session.history == [("类型#裙*颜色#黑色", full.strip())]


def test_bad_prefix_path_is_one_line(capsys):
    from ptuning.chat import main

    assert main(["--prefix-checkpoint", "/no/such/checkpoint"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --prefix-checkpoint=/no/such/checkpoint: no such folder"]
    assert main(["--model-path", "/no/such/model"]) == 2
    assert capsys.readouterr().err.startswith("error: --model-path=/no/such/model: no such folder")
    assert main(["--no-prefix", "--top-p", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == "error: --top-p=1.5: expected a number in (0, 1]"


# ---- faults found by trying the toolkit as a user would (one test per kind, named by item) ----


def test_an_unfinished_character_is_shown_as_evaluation_and_the_server_decode_it(model, tokenizer, monkeypatch):
    """One rule with evaluation and the server: a character the model never completed inside the answer stays
    U+FFFD (as the tokenizer decodes it), one cut off at the very end by the token limit is dropped."""
    import ptuning.evaluation.generate as generate_module
    from ptuning.models.chatglm.template import ChatGLMTemplate as Template

    ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("这条黑色龘裙😀，好"))
    # 这条黑色, 2 of 龘's 3 bytes, 裙 (龘 never completes), then 2 of 😀's 4 bytes when --max-new-tokens cuts
    answer_ids = ids[:3] + [ids[4]] + ids[5:7]
    evaluated = Template(tokenizer).decode(answer_ids)
    assert evaluated == "这条黑色\ufffd\ufffd裙"  # evaluation's text of these ids
    monkeypatch.setattr(generate_module, "stream_ids", lambda *args, **kwargs: (i for i in answer_ids))
    session = ChatSession(model, ChatGLMTemplate(tokenizer), GenerationSettings(max_new_tokens=6), 2048)
    _, prompt_ids, _, _ = session.prepare("类型#裙")
    pieces = list(session.reply("类型#裙", prompt_ids))
    assert "".join(pieces) == evaluated and not any(p.endswith("\ufffd") for p in pieces[:-1])
    assert session.history == [("类型#裙", evaluated)]
    prompt, _, _, _ = session.prepare("再写一段")
    assert f"答：{evaluated}\n" in prompt


def test_chat_warns_in_one_line_when_the_prefix_was_trained_on_another_model(tmp_path, model, capsys):
    import shutil

    from ptuning.chat import load, parse_args
    from ptuning.config import BUILTIN_MODEL

    checkpoint = save_checkpoint(tmp_path / "run", 1, model,
                                 prefix_metadata(model, base_model_name(ModelConfig())))
    other = tmp_path / "other-model"
    shutil.copytree(BUILTIN_MODEL, other)
    capsys.readouterr()
    load(parse_args(["--prefix-checkpoint", str(checkpoint), "--model-path", str(other), "--device", "cpu"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {checkpoint} was trained on builtin:tiny-chatglm "), err
    assert f"but the model is {other.resolve()} (config fingerprint " in err[0]
    load(parse_args(["--prefix-checkpoint", str(checkpoint), "--device", "cpu"]))  # the model it was trained on
    assert capsys.readouterr().err == ""


def test_ctrl_c_while_the_chat_loads_exits_130_without_a_traceback(monkeypatch, capsys):
    import ptuning.chat as chat_module

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(chat_module, "load", interrupted)
    assert chat_module.main([]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


# ---- --no-prefix on a folder with a prefix inside; ChatGLM3's metadata line ----


@pytest.mark.parametrize("builtin", ["tiny-chatglm", "tiny-chatglm2"])
def test_no_prefix_on_a_folder_holding_a_prefix_says_what_chat_can_do(tmp_path, capsys, builtin):
    from ptuning import export as export_cli
    from ptuning.chat import main

    cfg = ModelConfig(path=f"builtin:{builtin}", pre_seq_len=4, prefix_dropout=0.0)
    prefixed = load_model(cfg)
    checkpoint = save_checkpoint(tmp_path / "run", 1, prefixed, prefix_metadata(prefixed, cfg.base_model_name))
    full = tmp_path / "full"
    assert export_cli.main(["full", "--checkpoint", str(checkpoint), "--out", str(full)]) == 0
    capsys.readouterr()
    assert main(["--model-path", str(full), "--no-prefix"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --model-path={full}: the folder holds a prefix in its weights "
                                               "(pre_seq_len 4 in config.json")
    assert f"--prefix-checkpoint {full} instead of --no-prefix" in err[0] and "model.pre_seq_len" not in err[0]
    # what the message offers works
    from ptuning.chat import load, parse_args

    loaded, what = load(parse_args(["--model-path", str(full), "--prefix-checkpoint", str(full)]))
    assert what == f"{full} + prefix {full}"


def test_chatglm3_answers_leave_out_the_metadata_line(monkeypatch):
    from ptuning.build import load as load_family

    loaded = load_family(ModelConfig(path="builtin:tiny-chatglm3"), pre_seq_len=None, init=False)
    tok = loaded.tokenizer
    decoder = Detokenizer(tok, strip_leading=True)
    pieces = [decoder.push(i) for i in tok.sp_encode("\n") + tok.sp_encode("这条裙子。")]
    assert "".join(pieces) + decoder.finish() == "这条裙子。"
    assert tok.decode(tok.sp_encode("\n") + tok.sp_encode("这条裙子。"), skip_special_tokens=True) != "这条裙子。"
    # a real answer of the tiny ChatGLM3, streamed as chat streams it
    session = ChatSession(loaded.model.eval(), loaded.template, GenerationSettings(max_new_tokens=12),
                          loaded.max_positions)
    query = "类型#裙*颜色#白色"
    _, ids, _, _ = session.prepare(query)
    text = "".join(session.reply(query, ids))
    assert text and not text[0].isspace(), repr(text)
    assert session.history == [(query, text.strip())]


# ---- flags refused at start; an empty answer ----


def test_max_new_tokens_beyond_the_models_positions_is_refused_at_start(original_checkpoint, capsys):
    from ptuning.chat import main

    assert main(["--prefix-checkpoint", str(original_checkpoint), "--max-new-tokens", "2000"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == ["error: --max-new-tokens=2000: the model has 512 positions for the prompt and "
                                         "the answer together; expected at most 504"]
    assert "Chatting with" not in captured.out


def test_no_prefix_together_with_a_prefix_checkpoint_is_refused(original_checkpoint, capsys):
    from ptuning.chat import main

    assert main(["--no-prefix", "--prefix-checkpoint", str(original_checkpoint)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --no-prefix and --prefix-checkpoint {original_checkpoint} contradict each other: give one of them"]


def test_an_answer_the_model_ends_at_once_is_shown_as_empty_answer(model, tokenizer, monkeypatch):
    import io

    import ptuning.evaluation.generate as generate_module
    from ptuning.chat import EMPTY_ANSWER, chat_loop

    answers = iter([[], tokenizer.convert_tokens_to_ids(tokenizer.tokenize("好"))])
    monkeypatch.setattr(generate_module, "stream_ids", lambda *args, **kwargs: (i for i in next(answers)))
    session = ChatSession(model, ChatGLMTemplate(tokenizer), GenerationSettings(max_new_tokens=4), 2048)
    queries = iter(["类型#裙", "再写一段", "exit"])
    out = io.StringIO()
    chat_loop(session, read=lambda _: next(queries), out=out, err=io.StringIO())
    assert out.getvalue() == f"{BOT_PREFIX}{EMPTY_ANSWER}\n{BOT_PREFIX}好\n"
    assert session.history == [("类型#裙", ""), ("再写一段", "好")]
