"""Data pipeline: prompt template, features by the original rules, collation, loading and bad input."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ptuning.data import (
    IGNORE_INDEX,
    DataConfig,
    DataError,
    GenerationCollator,
    LengthGroupedSampler,
    TrainingCollator,
    build_datasets,
    exit_on_data_error,
    preprocess_eval,
    preprocess_train,
    read_rows,
)
from ptuning.data.__main__ import main as check_main
from ptuning.models.chatglm.masks import build_masks
from ptuning.models.chatglm.template import ChatGLMTemplate, build_prompt
from ptuning.models.chatglm.tokenizer import ChatGLMTokenizer

from .common import ROOT, parity_sets

PAD, MASK, GMASK, BOS, EOS = 3, 990, 991, 994, 995
SAMPLE = ROOT / "data" / "adgen_sample"


class CharTokenizer:
    """One token per character (id = code point), with ChatGLM's special ids and input layout."""

    pad_token_id, gmask_token_id, bos_token_id, eos_token_id = PAD, GMASK, BOS, EOS

    def tokenize(self, text: str) -> list[str]:
        return list(text)

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [ord(char) for char in tokens]

    def build_inputs_with_special_tokens(self, a: list[int], b: list[int] | None = None) -> list[int]:
        return a + [GMASK, BOS] + ([] if b is None else b + [EOS])


class TableTokenizer(CharTokenizer):
    """Encodes each text to the ids given for it."""

    def __init__(self, table: dict[str, list[int]]):
        self.table = table

    def tokenize(self, text: str) -> list[str]:
        return [text]

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return list(self.table[tokens[0]])


def ords(text: str) -> list[int]:
    return [ord(char) for char in text]


def batch(*rows: dict) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in rows[0]}


@pytest.fixture(scope="module")
def tok() -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_pretrained(ROOT / "data" / "tokenizer")


def write_lines(path, lines: list[str | bytes]):
    data = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    path.write_bytes(data)
    return path


def write_jsonl(path, rows: list[dict]):
    return write_lines(path, [json.dumps(row, ensure_ascii=False) for row in rows])


# ---- template ----


def test_prompt_without_history_is_the_query():
    assert build_prompt("你好") == "你好"
    assert build_prompt("你好", []) == "你好"


def test_prompt_with_history():
    expected = "[Round 0]\n问：q0\n答：r0\n[Round 1]\n问：q1\n答：r1\n[Round 2]\n问：q2\n答："
    assert build_prompt("q2", [("q0", "r0"), ("q1", "r1")]) == expected


# ---- config ----


def test_config_checks():
    with pytest.raises(ValueError, match="max_source_length must be >= 2"):
        DataConfig(max_source_length=1)
    with pytest.raises(ValueError, match="max_target_length must be >= 2"):
        DataConfig(max_target_length=0)
    with pytest.raises(ValueError, match="max_train_samples must be a positive integer"):
        DataConfig(max_train_samples=0)
    with pytest.raises(ValueError, match="both 'x'"):
        DataConfig(prompt_column="x", response_column="x")
    with pytest.raises(ValueError, match="no test_file configured"):
        DataConfig().file_for("test")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        DataConfig().file_for("dev")


# ---- features, hand-written ----


def test_train_features_follow_the_original_rules():
    cfg = DataConfig(max_source_length=8, max_target_length=8)
    out = preprocess_train(batch({"content": "abc", "summary": "xy"}), ChatGLMTemplate(CharTokenizer()), cfg)
    assert out["input_ids"] == [[97, 98, 99, GMASK, BOS, 120, 121, EOS]]
    assert out["labels"] == [[-100, -100, -100, -100, BOS, 120, 121, EOS]]


def test_train_truncation_at_both_limits():
    cfg = DataConfig(max_source_length=3, max_target_length=4)
    rows = batch(
        {"content": "abcdef", "summary": "uvwxyz"},  # both over: 2 prompt and 2 response tokens kept
        {"content": "ab", "summary": "uv"},  # exactly at both limits: unchanged
        {"content": "a", "summary": "u"},
    )
    out = preprocess_train(rows, ChatGLMTemplate(CharTokenizer()), cfg)
    assert out["input_ids"] == [
        [97, 98, GMASK, BOS, 117, 118, EOS],
        [97, 98, GMASK, BOS, 117, 118, EOS],
        [97, GMASK, BOS, 117, EOS],
    ]
    assert out["labels"][0] == [-100, -100, -100, BOS, 117, 118, EOS]
    assert out["labels"][2] == [-100, -100, BOS, 117, EOS]
    # what each row lost: 4 of 6 prompt characters and 4 of 6 response characters, then nothing
    assert out["truncated_tokens"] == [4, 0, 0] and out["truncated_answer_tokens"] == [4, 0, 0]


def test_history_and_source_prefix_go_into_the_prompt():
    cfg = DataConfig(history_column="history", source_prefix="P:", max_source_length=100)
    row = {"content": "q1", "summary": "r", "history": [["q0", "r0"]]}
    out = preprocess_train(batch(row), ChatGLMTemplate(CharTokenizer()), cfg)
    prompt = "P:[Round 0]\n问：q0\n答：r0\n[Round 1]\n问：q1\n答："
    assert out["input_ids"] == [ords(prompt) + [GMASK, BOS] + ords("r") + [EOS]]
    empty = preprocess_train(batch({**row, "history": []}), ChatGLMTemplate(CharTokenizer()), cfg)
    assert empty["input_ids"][0][:4] == ords("P:q1")


def test_ignore_pad_token_for_loss():
    row = batch({"content": "a", "summary": "x\x03y"})  # a literal pad id inside the response
    kept = preprocess_train(row, ChatGLMTemplate(CharTokenizer()), DataConfig(ignore_pad_token_for_loss=False))
    dropped = preprocess_train(row, ChatGLMTemplate(CharTokenizer()), DataConfig(ignore_pad_token_for_loss=True))
    assert kept["labels"] == [[-100, -100, BOS, 120, PAD, 121, EOS]]
    assert dropped["labels"] == [[-100, -100, BOS, 120, -100, 121, EOS]]
    features = [{"input_ids": [1, 2], "labels": [-100, 2]}, {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]
    tokenizer = CharTokenizer()
    assert TrainingCollator.from_config(tokenizer, DataConfig())(features)["labels"][0, 2] == IGNORE_INDEX
    off = DataConfig(ignore_pad_token_for_loss=False)
    assert TrainingCollator.from_config(tokenizer, off)(features)["labels"][0, 2] == PAD


def test_eval_features_keep_two_fewer_prompt_tokens_and_the_full_reference():
    cfg = DataConfig(max_source_length=4, max_target_length=2, source_prefix="P")
    out = preprocess_eval(batch({"content": "abcdef", "summary": "a long reference"}), ChatGLMTemplate(CharTokenizer()), cfg)
    assert out == {"prompt": ["Pabcdef"], "input_ids": [[80, 97, GMASK, BOS]], "reference": ["a long reference"],
                   "dropped_turns": [0], "truncated_tokens": [5]}


def test_features_with_the_real_tokenizer(tok):
    line = json.loads((SAMPLE / "train.json").read_text(encoding="utf-8").split("\n")[0])
    cfg = DataConfig(max_source_length=10, max_target_length=6)
    out = preprocess_train(batch(line), ChatGLMTemplate(tok), cfg)
    prompt = tok.encode(line["content"], add_special_tokens=False)
    response = tok.encode(line["summary"], add_special_tokens=False)
    assert len(prompt) > 9 and len(response) > 4
    assert out["input_ids"] == [prompt[:9] + [GMASK, BOS] + response[:4] + [EOS]]
    assert out["labels"] == [[-100] * 10 + [BOS] + response[:4] + [EOS]]
    evaluated = preprocess_eval(batch(line), ChatGLMTemplate(tok), cfg)
    assert evaluated["input_ids"] == [prompt[:8] + [GMASK, BOS]]
    # the features' fast path encodes exactly as tokenizer.encode
    texts = ["问：你好\n答：", "a  <sop> b [gMASK]\t", "   ", "龘"]
    for text in texts:
        [ids] = preprocess_eval(
            batch({"content": text, "summary": "x"}), ChatGLMTemplate(tok), DataConfig(max_source_length=100)
        )["input_ids"]
        assert ids == tok.encode(text)


@pytest.mark.parametrize("folder", parity_sets(), ids=lambda p: p.name)
def test_train_batch_equals_the_parity_layout(folder):
    vectors = load_file(folder / "vectors.safetensors")
    train = json.loads((folder / "cases.json").read_text())["cases"]["train"]
    cfg = DataConfig(
        max_source_length=train["max_source_length"], max_target_length=train["max_target_length"]
    )
    table, rows, truncated = {}, [], 0
    for i, ids in enumerate(vectors["train.input_ids"].tolist()):
        gmask, eos = ids.index(GMASK), ids.index(EOS)
        prompt, response = ids[:gmask], ids[gmask + 2 : eos]
        # a part at its limit gets extra ids, which the truncation must drop again
        full = len(prompt) == cfg.max_source_length - 1 and len(response) == cfg.max_target_length - 2
        table[f"p{i}"] = prompt + [7] * 5 * full
        table[f"r{i}"] = response + [8] * 5 * full
        rows.append({"content": f"p{i}", "summary": f"r{i}"})
        truncated += full
    assert truncated > 0
    tokenizer = TableTokenizer(table)
    features = preprocess_train(batch(*rows), ChatGLMTemplate(tokenizer), cfg)
    collated = TrainingCollator.from_config(tokenizer, cfg)(
        [
            {"input_ids": a, "labels": b}
            for a, b in zip(features["input_ids"], features["labels"], strict=True)
        ]
    )
    width = collated["input_ids"].shape[1]
    assert width == max(len(ids) for ids in features["input_ids"])
    assert torch.equal(collated["input_ids"], vectors["train.input_ids"][:, :width])
    assert torch.equal(collated["labels"], vectors["train.labels"][:, :width])
    # the rest of the original's fixed-length padding is pads / ignored labels only
    assert vectors["train.input_ids"][:, width:].eq(PAD).all()
    assert vectors["train.labels"][:, width:].eq(IGNORE_INDEX).all()


# ---- collation ----


def test_training_collator_right_pads_to_the_longest():
    rows = [
        {"input_ids": [5, 6], "labels": [-100, 6]},
        {"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]},
    ]
    out = TrainingCollator(pad_token_id=PAD)(rows)
    assert set(out) == {"input_ids", "labels"}
    assert out["input_ids"].tolist() == [[5, 6, PAD, PAD], [5, 6, 7, 8]]
    assert out["labels"].tolist() == [[-100, 6, -100, -100], [-100, 6, 7, 8]]
    assert out["input_ids"].dtype == out["labels"].dtype == torch.int64


def test_generation_collator_left_pads_like_the_tokenizer(tok):
    texts = ["这件", "这条黑色工装裤，长款包裹双腿"]
    rows = [{"input_ids": tok(text)["input_ids"], "reference": f"ref {i}"} for i, text in enumerate(texts)]
    out = GenerationCollator.from_tokenizer(tok)(rows)
    encoded = tok(texts, padding=True, return_tensors="pt")
    assert torch.equal(out["input_ids"], encoded["input_ids"])
    assert out["attention_mask"].dtype == torch.int64
    assert out["attention_mask"].tolist()[0] == [0] * (out["input_ids"].shape[1] - 3) + [1, 1, 1]
    assert out["reference"] == ["ref 0", "ref 1"]
    # the model turns the padding mask into the tokenizer's mask and positions
    hidden, positions = build_masks(
        out["input_ids"],
        bos_token_id=BOS,
        mask_token_id=MASK,
        gmask_token_id=GMASK,
        padding_mask=out["attention_mask"],
    )
    assert torch.equal(hidden, encoded["attention_mask"]) and torch.equal(positions, encoded["position_ids"])


def test_length_grouped_sampler():
    lengths = [(i * 37) % 101 for i in range(1000)]
    sampler = LengthGroupedSampler(lengths, batch_size=4, mega_batch_mult=5, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(1000)) and len(sampler) == 1000
    assert lengths[order[0]] == max(lengths)  # the longest batch comes first
    for start in range(0, 1000, 20):
        mega = [lengths[i] for i in order[start : start + 20]]
        assert mega == sorted(mega, reverse=True)
    assert list(sampler) == order
    sampler.set_epoch(1)
    assert list(sampler) != order

    # grouping: much less padding than a plain shuffle
    def waste(indices):
        return sum(max(lengths[i] for i in indices[s : s + 4]) * 4 for s in range(0, 1000, 4))

    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    assert waste(order) < 0.8 * waste(shuffled)


# ---- loading: good files ----


def test_reads_json_lines_json_arrays_and_csv(tmp_path):
    rows = [
        {"content": "类型#裙", "summary": "这条裙子", "extra": 1},
        {"content": "a", "summary": "b", "extra": None},
    ]
    lines = write_jsonl(tmp_path / "d.jsonl", rows)
    array = tmp_path / "d.json"
    array.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    table = tmp_path / "d.csv"
    table.write_text('content,summary\n类型#裙,这条裙子\n"a","b"\n', encoding="utf-8")
    expected = [{"content": "类型#裙", "summary": "这条裙子"}, {"content": "a", "summary": "b"}]
    for path in (lines, array, table):
        assert read_rows(path, DataConfig()).rows == expected


def test_build_datasets_on_the_bundled_sample(tok, tmp_path):
    cfg = DataConfig(
        train_file=str(SAMPLE / "train.json"),
        validation_file=str(SAMPLE / "dev.json"),
        max_eval_samples=5,
        cache_dir=str(tmp_path),
    )
    train = build_datasets(cfg, ChatGLMTemplate(tok), "train")
    assert train.num_rows == 2000
    assert train.column_names == ["input_ids", "labels", "dropped_turns", "truncated_tokens",
                                  "truncated_answer_tokens"]
    first = json.loads((SAMPLE / "train.json").read_text(encoding="utf-8").split("\n")[0])
    assert train[0] == {key: value[0] for key, value in preprocess_train(batch(first), ChatGLMTemplate(tok), cfg).items()}
    dev = build_datasets(cfg, ChatGLMTemplate(tok), "validation")
    assert dev.num_rows == 5 and dev.column_names[:3] == ["prompt", "input_ids", "reference"]
    assert dev[0]["input_ids"][-2:] == [GMASK, BOS]
    again = build_datasets(cfg, ChatGLMTemplate(tok), "train")
    assert again.cache_files == train.cache_files  # reused from the datasets cache


def test_build_datasets_in_worker_processes_and_with_history_csv(tok, tmp_path):
    table = tmp_path / "chat.csv"
    history = json.dumps([["你好", "你好！"]], ensure_ascii=False).replace('"', '""')
    body = "".join(f'问题{i},回答{i},"{history if i % 2 else ""}"\n' for i in range(40))
    table.write_text("q,a,h\n" + body, encoding="utf-8")
    cfg = DataConfig(
        train_file=str(table),
        prompt_column="q",
        response_column="a",
        history_column="h",
        max_source_length=200,
        max_train_samples=30,
        cache_dir=str(tmp_path),
    )
    single = build_datasets(cfg, ChatGLMTemplate(tok), "train")
    parallel = build_datasets(DataConfig(**{**vars(cfg), "preprocessing_num_workers": 2}), ChatGLMTemplate(tok), "train")
    assert single.num_rows == parallel.num_rows == 30
    assert single["input_ids"] == parallel["input_ids"]

    def encode(text):
        return tok.encode(text, add_special_tokens=False)

    with_history = encode(build_prompt("问题1", [("你好", "你好！")]))
    assert single[1]["input_ids"] == with_history + [GMASK, BOS] + encode("回答1") + [EOS]
    assert single[0]["input_ids"] == encode("问题0") + [GMASK, BOS] + encode("回答0") + [EOS]


def test_a_changed_file_is_not_served_from_the_cache(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{"content": "a", "summary": "b"}])
    cfg = DataConfig(validation_file=str(path), cache_dir=str(tmp_path / "cache"))
    assert build_datasets(cfg, ChatGLMTemplate(tok), "validation")["reference"] == ["b"]
    write_jsonl(path, [{"content": "a", "summary": "c"}])
    assert build_datasets(cfg, ChatGLMTemplate(tok), "validation")["reference"] == ["c"]


# ---- loading: bad input, one test per problem ----

BAD_JSON_LINES = [
    ('{"content": "a", "summary": "b"', r"line 2: malformed JSON: Expecting ',' delimiter at column 32"),
    ('{"content": "a", "title": "b"}', r"line 2: no column 'summary' \(columns: 'content', 'title'\)"),
    ('{"content": "a", "summary": 5}', r"line 2: 'summary' is a int \(5\), expected a string"),
    ('{"content": "a", "summary": null}', r"line 2: 'summary' is null, expected a string"),
    ('{"content": ["a"], "summary": "b"}', r"line 2: 'content' is a list \(\[\"a\"\]\), expected a string"),
    ('{"content": "", "summary": "b"}', r"line 2: 'content' is empty"),
    ('{"content": "a", "summary": "  "}', r"line 2: 'summary' is empty"),
    ('{"content": "a", "summary": "\\udc80"}', r"line 2: 'summary' holds undecodable bytes"),
    ('["a", "b"]', r"line 2: expected a JSON object, got a list"),
]


@pytest.mark.parametrize(
    ("line", "message"), BAD_JSON_LINES, ids=[m.split(": ", 1)[1][:24] for _, m in BAD_JSON_LINES]
)
def test_bad_json_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.json", ['{"content": "ok", "summary": "ok"}', line, ""])
    with pytest.raises(DataError, match=rf"^{tmp_path}/bad\.json, {message}") as err:
        read_rows(path, DataConfig())
    assert "skip_bad_rows" in str(err.value)


def test_undecodable_bytes(tmp_path):
    path = write_lines(
        tmp_path / "bad.jsonl", ['{"content": "ok", "summary": "ok"}', "", b'{"content": "\xff\xfe"}']
    )
    with pytest.raises(
        DataError, match=r"bad\.jsonl, line 3: undecodable bytes at column 14 \(the file must be UTF-8\)"
    ):
        read_rows(path, DataConfig())


@pytest.mark.parametrize(
    ("history", "message"),
    [
        ('"earlier"', r"'h' must be a list of \[query, response\] pairs, got a str"),
        ('[["q"]]', r"'h' must be a list of \[query, response\] pairs; turn 0 is \[\"q\"\]"),
        (
            '[["q", "r"], ["q", 1]]',
            r"'h' must be a list of \[query, response\] pairs; turn 1 is \[\"q\", 1\]",
        ),
        (
            '[["q", "r", "x"]]',
            r"'h' must be a list of \[query, response\] pairs; turn 0 is \[\"q\", \"r\", \"x\"\]",
        ),
    ],
)
def test_bad_history(tmp_path, history, message):
    path = write_lines(tmp_path / "chat.json", [f'{{"content": "a", "summary": "b", "h": {history}}}'])
    with pytest.raises(DataError, match=rf"chat\.json, line 1: {message}"):
        read_rows(path, DataConfig(history_column="h"))


def test_null_history_is_no_history(tmp_path):
    path = write_lines(tmp_path / "chat.json", ['{"content": "a", "summary": "b", "h": null}'])
    assert read_rows(path, DataConfig(history_column="h")).rows == [{"content": "a", "summary": "b", "h": []}]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prompt,summary\na,b\n", r"line 2: no column 'content' \(columns: 'prompt', 'summary'\)"),
        ("content,summary\na,b\nc\n", r"line 3: 1 field, but the header has 2"),
        ("content,summary\na,b\nc,d,e\n", r"line 3: 3 fields, but the header has 2"),
        ("content,summary\na,b\nc,\n", r"line 3: 'summary' is empty"),
        (
            'content,summary,h\na,b,"[[1, 2]]"\n',
            r"line 2: 'h' must be a list of \[query, response\] pairs; turn 0",
        ),
        (
            "content,summary,h\na,b,not json\n",
            r"line 2: 'h' must be a JSON list of \[query, response\] pairs",
        ),
        ('content,summary\n"a\nstill a",b\nc,"\n', r"line 4: malformed CSV: unexpected end of data"),
    ],
)
def test_bad_csv(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=rf"bad\.csv, {message}"):
        read_rows(path, DataConfig(history_column="h" if ",h" in text else None))


def test_malformed_json_array(tmp_path):
    path = tmp_path / "array.json"
    path.write_text(
        '[\n  {"content": "a", "summary": "b"},\n  {"content": "a" "summary": "b"}\n]', encoding="utf-8"
    )
    with pytest.raises(
        DataError, match=r"array\.json, line 3: malformed JSON array: Expecting ',' delimiter"
    ):
        read_rows(path, DataConfig())


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match=r"missing\.json: file not found"):
        read_rows(tmp_path / "missing.json", DataConfig())
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(
        DataError, match=r"data\.txt: unsupported file type '\.txt': expected \.json, \.jsonl or \.csv"
    ):
        read_rows(tmp_path / "data.txt", DataConfig())
    (tmp_path / "empty.json").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.json: no usable rows$"):
        read_rows(tmp_path / "empty.json", DataConfig())


def test_errors_count_the_other_bad_rows(tmp_path):
    path = write_lines(tmp_path / "bad.json", ["{", '{"content": "a", "summary": "b"}', "{", "{"])
    with pytest.raises(DataError, match=r"line 1: malformed JSON.* \(2 more bad rows follow\)"):
        read_rows(path, DataConfig())


def test_skip_bad_rows_counts_and_reports_once(tmp_path, caplog):
    good = [json.dumps({"content": f"c{i}", "summary": f"s{i}"}) for i in range(3)]
    path = write_lines(
        tmp_path / "mixed.json", [good[0], "{", good[1], '{"content": 1, "summary": "x"}', good[2]]
    )
    with caplog.at_level(logging.WARNING, logger="ptuning.data.loading"):
        report = read_rows(path, DataConfig(skip_bad_rows=True))
    assert [row["content"] for row in report.rows] == ["c0", "c1", "c2"]
    assert report.skipped == 2 and report.first_problem.startswith("line 2: malformed JSON")
    assert len(caplog.records) == 1
    assert (
        "mixed.json: skipped 2 bad rows of 5 (first at line 2: malformed JSON"
        in caplog.records[0].getMessage()
    )
    only_bad = write_lines(tmp_path / "bad.json", ["{", "{"])
    with pytest.raises(
        DataError, match=r"no usable rows \(2 bad rows skipped, first at line 1: malformed JSON"
    ):
        read_rows(only_bad, DataConfig(skip_bad_rows=True))


def test_build_datasets_skips_bad_rows(tok, tmp_path):
    path = write_lines(
        tmp_path / "mixed.json", ['{"content": "a", "summary": "b"}', "{", '{"content": "c", "summary": "d"}']
    )
    cfg = DataConfig(validation_file=str(path), skip_bad_rows=True, cache_dir=str(tmp_path / "cache"))
    assert build_datasets(cfg, ChatGLMTemplate(tok), "validation")["reference"] == ["b", "d"]
    with pytest.raises(DataError, match=r"mixed\.json, line 2: malformed JSON"):
        build_datasets(
            DataConfig(validation_file=str(path), cache_dir=str(tmp_path / "cache")), ChatGLMTemplate(tok), "validation"
        )


# ---- the exit: message, non-zero status, no traceback ----


def test_exit_on_data_error(capsys):
    with pytest.raises(SystemExit) as exit_info, exit_on_data_error():
        raise DataError("data/x.json, line 3: 'summary' is empty")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: data/x.json, line 3: 'summary' is empty\n"


def test_check_command(tmp_path, capsys):
    check_main([str(SAMPLE / "dev.json")])
    assert capsys.readouterr().out.endswith("dev.json: 200 rows ok, 0 skipped\n")
    bad = write_lines(tmp_path / "bad.json", ['{"content": "a"}'])
    with pytest.raises(SystemExit) as exit_info:
        check_main([str(bad)])
    assert exit_info.value.code == 2
    assert "bad.json, line 1: no column 'summary' (columns: 'content')" in capsys.readouterr().err


def test_check_command_process_exits_without_traceback(tmp_path):
    bad = write_lines(tmp_path / "bad.json", ['{"content": "a", "summary": ""}'])
    result = subprocess.run(
        [sys.executable, "-m", "ptuning.data", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: {bad}, line 1: 'summary' is empty. Fix the data, or set data.skip_bad_rows=true to skip bad rows."
    )
    assert "Traceback" not in result.stderr


def test_build_datasets_training_features_for_the_validation_file(tok, tmp_path):
    cfg = DataConfig(
        train_file=str(SAMPLE / "train.json"),
        validation_file=str(SAMPLE / "dev.json"),
        max_eval_samples=4,
        cache_dir=str(tmp_path / "cache"),
    )
    dev = build_datasets(cfg, ChatGLMTemplate(tok), "validation", features="train")
    assert dev.num_rows == 4 and dev.column_names[:2] == ["input_ids", "labels"]
    with pytest.raises(ValueError, match="unknown features"):
        build_datasets(cfg, ChatGLMTemplate(tok), "validation", features="both")


# ---- faults found by trying the toolkit as a user would (one test per kind, named by item) ----


def test_a_file_with_other_column_names_names_the_column_keys(tok, tmp_path):
    csv_file = tmp_path / "mine.csv"
    csv_file.write_text("input,output\n广告词,一段文案\n裙子,黑色\n", encoding="utf-8")
    hint = ("no row has it: set data.prompt_column to this file (data.train_file)'s column. data.prompt_column "
            "applies to data.train_file, data.validation_file and data.test_file alike, so they must use the same "
            "column names")
    expected = f"{csv_file}, line 2: no column 'content' (columns: 'input', 'output'); {hint}"
    cfg = DataConfig(train_file=str(csv_file), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as err:
        build_datasets(cfg, ChatGLMTemplate(tok), "train")
    assert str(err.value) == expected
    # skip_bad_rows cannot help when no row has the column: the same hint, not "no usable rows"
    cfg.skip_bad_rows = True
    with pytest.raises(DataError) as err:
        build_datasets(cfg, ChatGLMTemplate(tok), "train")
    assert str(err.value) == expected
    # the training file fits the keys, the validation file does not: the message names the file's key
    cfg = DataConfig(train_file=str(SAMPLE / "train.json"), validation_file=str(csv_file), max_train_samples=4,
                     cache_dir=str(tmp_path / "cache"))
    build_datasets(cfg, ChatGLMTemplate(tok), "train")
    with pytest.raises(DataError, match=r"set data\.prompt_column to this file \(data\.validation_file\)'s column"):
        build_datasets(cfg, ChatGLMTemplate(tok), "validation")
    # some rows lack the column: those are bad rows, which skip_bad_rows may skip
    partly = write_lines(tmp_path / "partly.json", ['{"content": "a", "summary": "b"}', '{"content": "c"}'])
    with pytest.raises(DataError, match=r"line 2: no column 'summary' \(columns: 'content'\)\. Fix the data, or set "
                                        r"data\.skip_bad_rows=true to skip bad rows\.$"):
        read_rows(partly, DataConfig())
    assert read_rows(partly, DataConfig(skip_bad_rows=True)).skipped == 1


def test_bad_row_messages_read_as_sentences_and_count_the_rest(tmp_path, caplog):
    control = write_lines(tmp_path / "control.json", ['{"content": "a\tb", "summary": "s"}'])
    with pytest.raises(DataError) as err:
        read_rows(control, DataConfig())
    assert "malformed JSON: Invalid control character at column 15." in str(err.value)
    assert " at at " not in str(err.value)
    unterminated = write_lines(tmp_path / "unterminated.json", ['{"content": "a'])
    with pytest.raises(DataError, match=r"malformed JSON: Unterminated string starting at column 13\."):
        read_rows(unterminated, DataConfig())
    one_more = write_lines(tmp_path / "two.json", ["{", "{", '{"content": "a", "summary": "b"}'])
    with pytest.raises(DataError, match=r"line 1: malformed JSON.* \(1 more bad row follows\)\."):
        read_rows(one_more, DataConfig())
    with caplog.at_level(logging.WARNING, logger="ptuning.data.loading"):
        read_rows(write_lines(tmp_path / "one.json", ["{", '{"content": "a", "summary": "b"}']),
                  DataConfig(skip_bad_rows=True))
    assert "skipped 1 bad row of 2 (first at line 1" in caplog.records[0].getMessage()
    with pytest.raises(DataError, match=r"no usable rows \(1 bad row skipped, first at line 1"):
        read_rows(write_lines(tmp_path / "bad.json", ["{"]), DataConfig(skip_bad_rows=True))


def test_an_empty_history_trains_on_the_raw_question_as_the_docs_say(tok):
    cfg = DataConfig(prompt_column="prompt", response_column="response", history_column="history",
                     max_source_length=256)
    batch = {"prompt": ["你好"], "response": ["好"], "history": [[]]}
    features = preprocess_train(batch, ChatGLMTemplate(tok), cfg)
    raw = preprocess_train({"prompt": ["你好"], "response": ["好"]}, ChatGLMTemplate(tok), DataConfig(prompt_column="prompt",
                                                                                 response_column="response"))
    assert features["input_ids"] == raw["input_ids"]  # not "[Round 0]\n问：你好\n答："
    with_turn = preprocess_train({**batch, "history": [[["早", "早上好"]]]}, ChatGLMTemplate(tok), cfg)
    prompt = build_prompt("你好", [("早", "早上好")])
    assert prompt.endswith("[Round 1]\n问：你好\n答：")
    ids = tok.convert_tokens_to_ids(tok.tokenize(prompt))
    assert with_turn["input_ids"][0][: len(ids)] == ids
    docs = (ROOT / "docs" / "families.md").read_text(encoding="utf-8")
    preset = docs.split("`conf=ptuning_chat` is the original `train_chat.sh`", 1)[1].split("\n\n", 1)[0]
    preset = " ".join(preset.split())
    assert "differs from the original in two ways" in preset
    assert "A row whose history is empty trains on the raw question" in preset
    assert "`[Round 0]\\n问：{question}\\n答：`" in preset
    assert "loses whole oldest turns first" in preset  # the other difference (the truncation rule)
    assert "raw question" in (ROOT / "conf" / "conf" / "ptuning_chat.yaml").read_text(encoding="utf-8")


def test_every_cut_is_counted_in_one_line_naming_the_split_and_purpose(tok, tmp_path, caplog):
    """docs/configuration.md: "training and evaluation print how many rows lost turns or tokens". Plain rows cut to
    max_source_length / max_target_length are counted too, and a file read for several purposes (the same
    chat file for training and validation) says which reading each line is about."""
    rows = [{"content": "类型#裙*颜色#白色*风格#清新*图案#碎花*裙长#连衣裙" * 2, "summary": "这条白色连衣裙清新自然，碎花图案显得温柔。" * 3},
            {"content": "裙", "summary": "好"}]
    plain = write_jsonl(tmp_path / "plain.json", rows)
    cfg = DataConfig(train_file=str(plain), validation_file=str(plain), max_source_length=8, max_target_length=8,
                     cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="ptuning.data.loading"):
        build_datasets(cfg, ChatGLMTemplate(tok), "train")
        build_datasets(cfg, ChatGLMTemplate(tok), "validation", features="train")
        build_datasets(cfg, ChatGLMTemplate(tok), "validation")
    assert [r.getMessage() for r in caplog.records] == [
        "data.train_file (plain.json, for training): of 2 rows, 1 had the prompt cut to fit data.max_source_length=8; "
        "1 had the response cut to data.max_target_length=8",
        "data.validation_file (plain.json, for the eval loss): of 2 rows, 1 had the prompt cut to fit "
        "data.max_source_length=8; 1 had the response cut to data.max_target_length=8",
        "data.validation_file (plain.json, for generation): of 2 rows, 1 had the prompt cut to fit "
        "data.max_source_length=8",  # generation keeps the whole reference
    ]
    caplog.clear()
    history = [["你好" * 10, "你好！" * 10]] * 3
    chat = write_jsonl(tmp_path / "chat.json", [{"prompt": "问题", "response": "回答", "history": history}] * 3)
    cfg = DataConfig(train_file=str(chat), validation_file=str(chat), prompt_column="prompt",
                     response_column="response", history_column="history", max_source_length=64,
                     cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="ptuning.data.loading"):
        build_datasets(cfg, ChatGLMTemplate(tok), "train")
        build_datasets(cfg, ChatGLMTemplate(tok), "validation")
    assert [r.getMessage() for r in caplog.records] == [
        f"data.{key} (chat.json, for {purpose}): of 3 rows, 3 left out their oldest turns (the current question is "
        "always kept) to fit data.max_source_length=64"
        for key, purpose in (("train_file", "training"), ("validation_file", "generation"))
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ptuning.data.loading"):  # nothing cut: nothing said
        build_datasets(DataConfig(train_file=str(SAMPLE / "train.json"), max_train_samples=50,
                                  cache_dir=str(tmp_path / "cache")), ChatGLMTemplate(tok), "train")
    assert caplog.records == []
