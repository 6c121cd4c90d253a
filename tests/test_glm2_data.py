"""Chat-format data (ChatGLM3 finetune_demo: ``conversations`` + ``tools``) through the data pipeline: rows become
the same features as the template builds them, tool turns and tools included; bad rows name their line."""

from __future__ import annotations

import json

import pytest

from ptuning.data.config import DataConfig
from ptuning.data.loading import DataError, build_datasets
from ptuning.models.base import conversation_from_messages
from ptuning.models.chatglm2.template import ChatGLM3Template
from ptuning.models.chatglm2.tokenizer import ChatGLM2Tokenizer

from .common import ROOT

ROWS = [
    {"conversations": [{"role": "user", "content": "类型#上衣*材质#棉"}, {"role": "assistant", "content": "这件纯棉上衣。"}]},
    {"conversations": [{"role": "system", "content": "你是导购"}, {"role": "user", "content": "白色好看吗"},
                       {"role": "assistant", "content": "好看"}, {"role": "user", "content": "棉的吗"},
                       {"role": "assistant", "content": "是的"}]},
    {"tools": [{"name": "get_weather", "parameters": {"city": "string"}}],
     "conversations": [{"role": "user", "content": "北京天气"},
                       {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": {"t": 3}},
                       {"role": "assistant", "content": "北京3度"}]},
]


@pytest.fixture(scope="module")
def template():
    return ChatGLM3Template(ChatGLM2Tokenizer.from_pretrained(ROOT / "data" / "tokenizer-chatglm3"))


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def config(tmp_path, path, **kw):
    return DataConfig(train_file=str(path), validation_file=str(path), conversation_column="conversations",
                      tools_column="tools", max_source_length=1024, max_target_length=64,
                      cache_dir=str(tmp_path / "cache"), **kw)


def test_chat_rows_become_the_templates_rows(tmp_path, template):
    cfg = config(tmp_path, write(tmp_path / "train.json", ROWS))
    train = build_datasets(cfg, template, "train")
    assert len(train) == 3
    for row, features in zip(ROWS, train, strict=True):
        conversation, answer = conversation_from_messages(row["conversations"], row.get("tools"))
        expected = template.train_row(conversation, answer, 1024, 64)
        assert features["input_ids"] == expected.input_ids and features["labels"] == expected.labels
    tok = template.tokenizer
    assert train[2]["input_ids"].count(tok.glm_tokens["<|observation|>"]) == 1
    assert tok.glm_tokens["<|system|>"] in train[2]["input_ids"]  # the tools' system prompt
    evaluation = build_datasets(cfg, template, "validation")
    assert [r["reference"] for r in evaluation] == ["这件纯棉上衣。", "是的", "北京3度"]
    assert evaluation[1]["input_ids"][-1] == tok.glm_tokens["<|assistant|>"]
    assert "<|user|>" in evaluation[1]["prompt"] and "好看" in evaluation[1]["prompt"]


@pytest.mark.parametrize(("row", "message"), [
    ({"conversations": [{"role": "user", "content": "q"}]}, "'conversations': the last message must be the assistant's"),
    ({"conversations": "q"}, "'conversations': expected a non-empty list of messages"),
    ({"messages": []}, "no column 'conversations'"),
    ({"conversations": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "b"}]}, "must alternate user, assistant"),
    ({"conversations": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]}, "query' is empty"),
])
def test_bad_chat_rows_name_their_line(tmp_path, template, row, message):
    path = write(tmp_path / "bad.json", [ROWS[0], row])
    with pytest.raises(DataError, match=f"bad.json, line 2: .*{message}"):
        build_datasets(config(tmp_path, path), template, "train")
    kept = build_datasets(config(tmp_path, path, skip_bad_rows=True), template, "train")
    assert len(kept) == 1


def test_config_refuses_mixed_formats():
    with pytest.raises(ValueError, match="tools_column needs conversation_column"):
        DataConfig(tools_column="tools")
    with pytest.raises(ValueError, match="exclude each other"):
        DataConfig(conversation_column="conversations", history_column="history")


def test_training_on_chat_data_with_the_tiny_chatglm3(tmp_path):
    from hydra_entry import to_object
    from ptuning.training import run as train_run

    from .test_configs import compose_train
    from .test_evaluate import reset_accelerate

    path = write(tmp_path / "chat.json", ROWS[:2] * 4)
    reset_accelerate()
    cfg = to_object(compose_train([
        "model=tiny_chatglm3", "data=conversations", f"data.train_file={path}", f"data.validation_file={path}",
        "data.max_target_length=64", f"train.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
        "train.max_steps=2", "train.save_steps=2", "train.per_device_batch_size=2", "train.eval_before_training=false",
        "train.eval_steps=null", "train.plot=false", "train.max_new_tokens=8",
    ]))
    assert (cfg.data.conversation_column, cfg.data.tools_column) == ("conversations", "tools")
    result = train_run(cfg)
    assert (result.checkpoint / "prefix.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert any("eval_rouge-l" in r for r in log)  # generation on the chat rows' final answers


# ---- tool turns on families without tools, unknown roles ----

def _templates():
    from ptuning.build import load
    from ptuning.config import ModelConfig

    return {name: load(ModelConfig(path=f"builtin:{name}", pre_seq_len=4)).template
            for name in ("tiny-chatglm", "tiny-chatglm2", "tiny-glm4")}


@pytest.fixture(scope="module")
def toolless():
    return _templates()


@pytest.mark.parametrize(("name", "message"), [
    ("tiny-chatglm", "ChatGLM-6B has no tools or tool / observation turns"),
    ("tiny-chatglm2", "ChatGLM2-6B has no tools or tool / observation turns"),
    ("tiny-glm4", "tools and tool / observation turns are ChatGLM3-6B's"),
])
def test_tool_rows_on_a_family_without_tools_are_bad_rows(tmp_path, toolless, name, message):
    template = toolless[name]
    rows = ROWS
    if not template.renders_system:  # ChatGLM-6B refuses line 2's system message too: leave it out here
        rows = [ROWS[0], {"conversations": ROWS[1]["conversations"][1:]}, ROWS[2]]
    path = write(tmp_path / "chat.json", rows)  # line 3 has tools and a tool turn
    for split in ("train", "validation"):
        with pytest.raises(DataError) as err:
            build_datasets(config(tmp_path, path), template, split)
        text = str(err.value)
        assert "\n" not in text and text.startswith(f"{path}, line 3: {message}"), text
        assert text.endswith("set data.skip_bad_rows=true to skip bad rows.")
        kept = build_datasets(config(tmp_path, path, skip_bad_rows=True), template, split)
        assert len(kept) == 2
    # tools alone (no tool turn) are refused the same way
    only_tools = {"tools": ROWS[2]["tools"], "conversations": ROWS[0]["conversations"]}
    with pytest.raises(DataError, match=f"line 2: {message}"):
        build_datasets(config(tmp_path, write(tmp_path / "t.json", [ROWS[0], only_tools])), template, "train")


def test_the_same_file_is_read_again_for_a_family_with_tools(tmp_path, toolless, template):
    path = write(tmp_path / "chat.json", ROWS)
    assert len(build_datasets(config(tmp_path, path, skip_bad_rows=True), toolless["tiny-chatglm2"], "train")) == 2
    # the skipped rows were the ChatGLM2 template's: ChatGLM3 (same cache) keeps all three
    assert len(build_datasets(config(tmp_path, path, skip_bad_rows=True), template, "train")) == 3


@pytest.mark.parametrize(("row", "message"), [
    ({"conversations": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "message 0: role 'robot': expected one of system, user, assistant, tool, observation"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "tool", "parameters": {}},
                        {"role": "assistant", "content": "a"}]},
     "a 'tool' message needs 'name'"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                        {"role": "assistant", "content": "a"}]},
     "a system message between the last user message and the answer"),
])
def test_bad_roles_and_tool_entries_name_their_line(tmp_path, template, row, message):
    path = write(tmp_path / "bad.json", [ROWS[0], row])
    with pytest.raises(DataError) as err:
        build_datasets(config(tmp_path, path), template, "train")
    assert "bad.json, line 2: " in str(err.value) and message in str(err.value), str(err.value)
    assert len(build_datasets(config(tmp_path, path, skip_bad_rows=True), template, "train")) == 1


def test_train_py_with_tool_rows_on_chatglm2_is_one_line(tmp_path):
    import subprocess
    import sys

    path = write(tmp_path / "chat.json", ROWS)
    base = [sys.executable, "train.py", "model=tiny_chatglm2", "data=conversations", f"data.train_file={path}",
            f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {path}, line 3: ChatGLM2-6B has no tools")
    assert not (tmp_path / "run").exists()


def test_a_system_message_on_chatglm6b_is_a_bad_row_and_rendered_elsewhere(tmp_path, toolless):
    """ChatGLM-6B's template has no system message: a row with one is refused, never silently dropped."""
    rows = [ROWS[0], {"conversations": [{"role": "system", "content": "be brief"}, *ROWS[0]["conversations"]]}]
    path = write(tmp_path / "sys.json", rows)
    with pytest.raises(DataError) as err:
        build_datasets(config(tmp_path, path), toolless["tiny-chatglm"], "train")
    assert "sys.json, line 2: ChatGLM-6B's template has no system message" in str(err.value), str(err.value)
    assert len(build_datasets(config(tmp_path, path, skip_bad_rows=True), toolless["tiny-chatglm"], "train")) == 1
    # families with a place for it keep both rows
    assert len(build_datasets(config(tmp_path, path), toolless["tiny-chatglm2"], "train")) == 2
