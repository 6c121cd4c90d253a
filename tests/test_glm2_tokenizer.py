"""The ChatGLM2/3 tokenizer: the recorded cases of the original tokenizer (every parity set that ships a
tokenizer.model) and hand-written cases on the bundled small tokenizers (data/tokenizer-chatglm{2,3})."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm

from ptuning.models.chatglm2.tokenizer import ChatGLM2Tokenizer

from .common import GLM2_PARITY_DIRS, ROOT, parity_sets, read_cases

TOKENIZER_SETS = [s for s in parity_sets(GLM2_PARITY_DIRS) if (s / "tokenizer.model").is_file()
                  and "tokenizer" in read_cases(s)]
assert TOKENIZER_SETS, "no ChatGLM2/3 parity set with a tokenizer"
BUNDLED = {2: ROOT / "data" / "tokenizer-chatglm2", 3: ROOT / "data" / "tokenizer-chatglm3"}


@pytest.fixture(params=TOKENIZER_SETS, ids=[s.name for s in TOKENIZER_SETS])
def recorded(request):
    folder = request.param
    cases = read_cases(folder)
    return ChatGLM2Tokenizer.from_pretrained(folder, chatglm_version=cases["chatglm_version"]), cases


def test_special_token_layout(recorded):
    tokenizer, cases = recorded
    tok = cases["tokenizer"]
    assert len(tokenizer) == tokenizer.vocab_size == tok["n_words"] == tok["tokenizer_vocab_size_property"]
    assert tokenizer.glm_tokens == tok["special_tokens"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (tok["pad_id"], tok["eos_id"])
    ids = cases["special_token_ids"]
    assert tokenizer.gmask_token_id == ids["[gMASK]"] and tokenizer.sop_token_id == ids["sop"]


def test_encode_decode_cases(recorded):
    tokenizer, cases = recorded
    for case in cases["tokenizer"]["encode_cases"]:
        assert tokenizer.tokenize(case["text"]) == case["pieces"]
        assert tokenizer.sp_encode(case["text"]) == case["sp_ids"]
        assert tokenizer.encode(case["text"]) == case["encode_add_special_tokens"]
        assert tokenizer.encode(case["text"], add_special_tokens=False) == case["encode_no_special_tokens"]
        assert tokenizer.decode(case["encode_add_special_tokens"]) == case["decode_of_encode"]
        assert tokenizer.decode(case["encode_add_special_tokens"], skip_special_tokens=True) == case["text"]


def test_inputs_with_special_tokens_and_left_padding(recorded):
    tokenizer, cases = recorded
    built = cases["tokenizer"]["build_inputs_with_special_tokens"]
    assert tokenizer.build_inputs_with_special_tokens(built["token_ids_0"]) == built["single"]
    assert tokenizer.build_inputs_with_special_tokens(built["token_ids_0"], built["token_ids_1"]) == built["pair"]
    batch = cases["tokenizer"]["batch_left_padded"]
    out = tokenizer(batch["texts"], padding=True)
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert out[key] == batch[key], key


def test_chat_inputs(recorded):
    tokenizer, cases = recorded
    tok = cases["tokenizer"]
    if cases["chatglm_version"] == 2:
        case = tok["build_prompt"]
        prompt = tokenizer.build_prompt(case["query"], case["history"])
        assert prompt == case["prompt"]
        assert tokenizer.encode(prompt) == case["input_ids"]
        with pytest.raises(ValueError, match="ChatGLM3"):
            tokenizer.build_single_message("user", "", "x")
        return
    case = tok["build_chat_input"]
    out = tokenizer.build_chat_input(case["query"], case["history"], case["role"])
    assert out["input_ids"][0].tolist() == case["input_ids"]
    assert out["attention_mask"][0].tolist() == case["attention_mask"]
    assert out["position_ids"][0].tolist() == case["position_ids"]
    assert tokenizer.sp_encode("\n") == case["newline_sp_ids"]
    special = tok["encode_special_tokens_true"]
    assert tokenizer.encode(special["text"]) == special["encode_with_flag_false"]
    folder = TOKENIZER_SETS[[s.name for s in TOKENIZER_SETS].index(cases["name"])]
    flagged = ChatGLM2Tokenizer.from_pretrained(folder, chatglm_version=3, encode_special_tokens=True)
    assert flagged.encode(special["text"]) == special["encode"]


# ---- the bundled tokenizers, hand-written cases ----


@pytest.fixture(params=[2, 3], ids=["chatglm2", "chatglm3"])
def bundled(request):
    return ChatGLM2Tokenizer.from_pretrained(BUNDLED[request.param]), request.param


def piece_ids(folder, pieces: list[str]) -> list[int]:
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ids = [sp.piece_to_id(p) for p in pieces]
    assert sp.unk_id() not in ids or pieces == ["<unk>"], pieces
    return ids


def test_bundled_layout(bundled):
    tokenizer, version = bundled
    assert tokenizer.chatglm_version == version  # from tokenizer_config.json
    assert tokenizer.sp_size == 1000
    expected = {"[MASK]": 1000, "[gMASK]": 1001, "[sMASK]": 1002, "sop": 1003, "eop": 1004}
    if version == 3:
        expected |= {"<|system|>": 1005, "<|user|>": 1006, "<|assistant|>": 1007, "<|observation|>": 1008}
    assert tokenizer.glm_tokens == expected
    assert len(tokenizer) == 1000 + len(expected)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 2, 0)
    assert tokenizer.get_command("[gMASK]") == 1001 and tokenizer.get_command("<eos>") == 2
    with pytest.raises(KeyError):
        tokenizer.get_command("<|user|>" if version == 2 else "<|tool|>")


def test_bundled_hand_written_ids(bundled):
    tokenizer, version = bundled
    folder = BUNDLED[version]
    # the dummy prefix and the newline byte, as the real tokenizer: "\n" -> ▁ <0x0A>
    assert tokenizer.encode("\n", add_special_tokens=False) == piece_ids(folder, ["▁", "<0x0A>"])
    assert tokenizer.encode("1x", add_special_tokens=False)[-2:][0] == piece_ids(folder, ["1"])[0]  # digits split
    text = "白色"
    assert tokenizer.encode(text) == [1001, 1003, *tokenizer.sp_encode(text)]
    assert tokenizer.encode(text, "毛衣") == [1001, 1003, *tokenizer.sp_encode(text), *tokenizer.sp_encode("毛衣"), 2]
    # GLM tokens written in text stay text
    assert 1003 not in tokenizer.encode("sop [gMASK]", add_special_tokens=False)
    assert tokenizer.decode([1001, 1003, *tokenizer.sp_encode("白色 毛衣"), 2, 0], skip_special_tokens=True) == "白色 毛衣"
    # an unseen character round-trips through the byte pieces
    assert tokenizer.decode(tokenizer.encode("Ω ü"), skip_special_tokens=True) == "Ω ü"


def test_bundled_left_padding_positions(bundled):
    tokenizer, _ = bundled
    out = tokenizer(["白色", "这件白色纯棉毛衣"], padding=True)
    short, long = out["input_ids"]
    pads = len(long) - len(tokenizer.encode("白色"))
    assert short[:pads] == [0] * pads and short[pads:pads + 2] == [1001, 1003]
    assert out["attention_mask"][0] == [0] * pads + [1] * (len(short) - pads)
    assert out["position_ids"][0] == [0] * pads + list(range(len(short) - pads))
    assert out["position_ids"][1] == list(range(len(long)))


def test_bundled_chatglm3_messages():
    tokenizer = ChatGLM2Tokenizer.from_pretrained(BUNDLED[3])
    newline = tokenizer.sp_encode("\n")
    assert tokenizer.build_single_message("user", "", "白色") == [1006, *newline, *tokenizer.sp_encode("白色")]
    assert tokenizer.build_single_message("assistant", "get_weather", "x") == [
        1007, *tokenizer.sp_encode("get_weather\n"), *tokenizer.sp_encode("x")]
    chat = tokenizer.build_chat_input("毛衣", [{"role": "system", "content": "你好"}])
    assert chat["input_ids"][0].tolist() == [1001, 1003, 1005, *newline, *tokenizer.sp_encode("你好"), 1006, *newline,
                                             *tokenizer.sp_encode("毛衣"), 1007]
    with pytest.raises(ValueError, match="role 'tool'"):
        tokenizer.build_single_message("tool", "", "x")
    assert tokenizer.encode("<|user|>", add_special_tokens=False) != [1006]
    flagged = ChatGLM2Tokenizer.from_pretrained(BUNDLED[3], encode_special_tokens=True)
    assert flagged.encode("<|user|>x<|assistant|>", add_special_tokens=False) == [1006, *tokenizer.sp_encode("x"), 1007]


def test_save_and_reload_keeps_the_version(tmp_path):
    tokenizer = ChatGLM2Tokenizer.from_pretrained(BUNDLED[3])
    tokenizer.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert stored["chatglm_version"] == 3
    again = ChatGLM2Tokenizer.from_pretrained(tmp_path)
    assert again.chatglm_version == 3 and again.encode("白色") == tokenizer.encode("白色")


def test_folder_without_a_version_is_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((BUNDLED[2] / "tokenizer.model").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm"}))
    with pytest.raises(ValueError, match="chatglm_version"):
        ChatGLM2Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "_name_or_path": "THUDM/chatglm3-6b"}))
    assert ChatGLM2Tokenizer.from_pretrained(tmp_path).chatglm_version == 3
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "_name_or_path": "/models/chatglm2-6b-32k"}))
    assert ChatGLM2Tokenizer.from_pretrained(tmp_path).chatglm_version == 2
