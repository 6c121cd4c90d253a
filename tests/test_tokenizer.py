"""ChatGLMTokenizer on the bundled small ice_text.model (ChatGLM layout, specials at 990..997)."""

from __future__ import annotations

import importlib.util
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from ptuning.models.chatglm.masks import build_masks
from ptuning.models.chatglm.tokenizer import ChatGLMTokenizer, decode_whitespace, encode_whitespace

from .common import ROOT, parity_sets

TOKENIZER_DIR = ROOT / "data" / "tokenizer"
PAD, MASK, GMASK, BOS, EOS = 3, 990, 991, 994, 995


@pytest.fixture(scope="module")
def tok() -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_pretrained(TOKENIZER_DIR)


def _original_whitespace(text: str) -> str:
    """The original SPTokenizer preprocessing, verbatim in behaviour: longest runs replaced first."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for length in range(80, 1, -1):
        text = text.replace(" " * length, f"<|blank_{length}|>")
    return text


# ---- vocabulary and special tokens ----


def test_special_token_ids(tok):
    assert (tok.pad_token_id, tok.mask_token_id, tok.gmask_token_id, tok.bos_token_id, tok.eos_token_id) == (
        PAD,
        MASK,
        GMASK,
        BOS,
        EOS,
    )
    assert tok.unk_token_id == 0
    assert tok.convert_ids_to_tokens(list(range(990, 998))) == [
        "[MASK]",
        "[gMASK]",
        "[sMASK]",
        "<unused_0>",
        "<sop>",
        "<eop>",
        "<ENC>",
        "<dBLOCK>",
    ]
    assert tok.convert_tokens_to_ids(["<pad>", "<n>", "<|tab|>", "<|blank_2|>", "<|blank_80|>"]) == [
        3,
        4,
        5,
        6,
        84,
    ]
    assert tok.vocab_size == len(tok) == 998
    assert tok.padding_side == "left"


def test_bundled_model_matches_tiny_config_ids():
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    assert config["num_image_tokens"] == 0
    for folder in parity_sets():
        ids = json.loads((folder / "config.json").read_text())
        assert (ids["pad_token_id"], ids["mask_token_id"], ids["gmask_token_id"]) == (PAD, MASK, GMASK)
        assert (ids["bos_token_id"], ids["eos_token_id"]) == (BOS, EOS)


def test_make_tokenizer_reproduces_the_bundled_model():
    spec = importlib.util.spec_from_file_location("make_tokenizer", ROOT / "data" / "make_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = module.corpus_lines(ROOT / "data" / "adgen_sample" / "train.json")
    assert module.train_ice_text(lines, 990) == (TOKENIZER_DIR / "ice_text.model").read_bytes()


def test_num_image_tokens_offsets_every_id(tok):
    shifted = ChatGLMTokenizer.from_pretrained(TOKENIZER_DIR, num_image_tokens=20000)
    text = "这件白色T恤\n宽松  版型"
    assert shifted.encode(text) == [i + 20000 for i in tok.encode(text)]
    assert (shifted.gmask_token_id, shifted.bos_token_id, shifted.eos_token_id) == (20991, 20994, 20995)
    assert shifted.pad_token_id == 20003
    assert len(shifted) == 20998
    assert shifted.convert_ids_to_tokens([7, 20004]) == ["<image_7>", "<n>"]
    assert shifted.convert_tokens_to_ids("<image_7>") == 7
    # image tokens have no text
    assert shifted.decode([7] + shifted.encode(text, add_special_tokens=False)) == text


# ---- text round trips ----


@pytest.mark.parametrize(
    "text",
    [
        "这件白色纯棉衬衫，宽松版型不挑身材。",
        "line one\nline two\n\nthree",
        "\tindented\t\ttabs\t",
        "a  b   c    d" + " " * 80 + "e" + " " * 81 + "f" + " " * 170 + "g",
        "  leading and trailing  ",
        "混合 Chinese 和 English, digits 0123456789 and 符号 #*！？",
        "从未见过的字：龘齉",
        "[gMASK] inside [sMASK] text",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_whitespace_becomes_pieces(tok):
    pieces = tok.tokenize("a\nb\tc  d" + " " * 83 + "e")
    assert "<n>" in pieces and "<|tab|>" in pieces and "<|blank_2|>" in pieces
    assert "<|blank_80|>" in pieces and "<|blank_3|>" in pieces


def test_whitespace_rewrite_equals_the_original_for_every_run_length():
    for length in range(1, 250):
        text = f"x{' ' * length}y\t\nz"
        assert encode_whitespace(text) == _original_whitespace(text)
        assert decode_whitespace(encode_whitespace(text)) == text


def test_special_tokens_in_text_split_as_the_original(tok):
    def ids(text):
        return tok.encode(text, add_special_tokens=False)

    # the HF named specials split the text and eat the spaces around them; each part gets its own
    # SentencePiece dummy prefix "▁"
    assert ids("x <eop> y") == ids("x") + [EOS] + ids("y")
    assert ids("a  [MASK]\tb") == ids("a") + [MASK] + ids("b")
    # [gMASK] is matched by SentencePiece inside the text: no split, no second dummy prefix
    assert ids("abc[gMASK]def") == ids("abc") + [GMASK] + ids("def")[1:]
    assert tok.convert_ids_to_tokens(ids("def")[:1]) == ["▁"]


def test_decode_drops_pads_and_can_skip_specials(tok):
    ids = tok.encode("这件白色衬衫", "宽松版型")
    assert ids[-1] == EOS
    assert tok.decode([PAD, PAD] + ids) == tok.decode(ids)
    response = ids[ids.index(BOS) + 1 :]  # what generation produces after the prompt
    assert tok.decode(response) == "宽松版型<eop>"
    assert tok.decode(response, skip_special_tokens=True) == "宽松版型"
    # as the original: [gMASK] is not one of the skipped specials
    assert tok.decode(ids, skip_special_tokens=True) == "这件白色衬衫[gMASK] 宽松版型"


# ---- model inputs ----


def test_build_inputs_with_special_tokens(tok):
    assert tok.build_inputs_with_special_tokens([10, 11]) == [10, 11, GMASK, BOS]
    assert tok.build_inputs_with_special_tokens([10, 11], [20]) == [10, 11, GMASK, BOS, 20, EOS]
    text = "这件白色衬衫"
    assert tok(text)["input_ids"] == tok.encode(text, add_special_tokens=False) + [GMASK, BOS]


def test_unpadded_call_returns_ids_only(tok):
    # as the original: mask and positions come only with padding (the model builds them otherwise)
    assert set(tok("这件")) == {"input_ids"}
    assert set(tok(["这件", "白色衬衫"])) == {"input_ids"}


def test_left_padded_batch_mask_and_positions(tok):
    texts = ["这件", "这条黑色工装裤，长款包裹双腿"]
    batch = tok(texts, padding=True, return_tensors="pt")
    ids, hidden, positions = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    seq = ids.shape[1]
    assert hidden.shape == (2, 1, seq, seq) and hidden.dtype == torch.bool
    assert positions.shape == (2, 2, seq) and positions.dtype == torch.int64
    short = tok(texts[0])["input_ids"]
    pads = seq - len(short)
    assert ids[0].tolist() == [PAD] * pads + short
    # pads hidden in both directions, positions restart at the first real token
    assert hidden[0, 0, :pads].all() and hidden[0, 0, :, :pads].all()
    assert positions[0, :, :pads].eq(0).all()
    alone = tok(texts[0], padding="max_length", max_length=len(short), return_tensors="pt")
    assert torch.equal(positions[0, :, pads:], alone["position_ids"][0])
    assert torch.equal(hidden[0, 0, pads:, pads:], alone["attention_mask"][0, 0])
    expected = build_masks(
        ids, bos_token_id=BOS, mask_token_id=MASK, gmask_token_id=GMASK, padding_mask=ids != PAD
    )
    assert torch.equal(hidden, expected[0]) and torch.equal(positions, expected[1])


def test_positions_freeze_at_mask_before_gmask_as_the_original_tokenizer(tok):
    # the original tokenizer prefers [MASK] when a row has both (the model prefers [gMASK])
    row = [10, MASK, 11, 12, GMASK, BOS, 20]
    batch = tok.pad({"input_ids": [row]}, padding=True, return_tensors="pt")
    assert batch["position_ids"][0].tolist() == [[0, 1, 2, 3, 4, 1, 1], [0, 0, 0, 0, 0, 1, 2]]


def test_single_text_padded_to_max_length(tok):
    encoded = tok("这件", padding="max_length", max_length=8, return_tensors="pt")
    assert encoded["input_ids"].shape == (1, 8)
    assert encoded["attention_mask"].shape == (1, 1, 8, 8)
    assert encoded["position_ids"].shape == (1, 2, 8)


@pytest.mark.parametrize("folder", parity_sets(), ids=lambda p: p.name)
@pytest.mark.parametrize("case", ["fwd_tok", "gen_tok"])
def test_padding_equals_the_original_tokenizer_vectors(tok, folder, case):
    vectors = load_file(folder / "vectors.safetensors")
    padded = vectors[f"{case}.input_ids"]
    rows = [row[row != PAD].tolist() for row in padded]  # ordinary ids are drawn from [5, 990)
    batch = tok.pad({"input_ids": rows}, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], padded)
    assert torch.equal(batch["attention_mask"], vectors[f"{case}.attention_mask"])
    assert torch.equal(batch["position_ids"], vectors[f"{case}.position_ids"])


def test_padding_style_gives_a_plain_mask():
    plain = ChatGLMTokenizer.from_pretrained(TOKENIZER_DIR, mask_style="padding")
    batch = plain(["这件", "这条黑色工装裤"], padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["attention_mask"].eq(batch["input_ids"].ne(PAD).long()).all()


def test_glm_padding_needs_the_special_tokens(tok):
    with pytest.raises(ValueError, match="contain no <sop>.*mask_style='padding'"):
        tok(["这件", "这条"], padding=True, add_special_tokens=False)


# ---- loading and saving ----


def test_save_and_load_round_trip(tok, tmp_path):
    custom = ChatGLMTokenizer.from_pretrained(TOKENIZER_DIR, num_image_tokens=5, mask_style="padding")
    written = custom.save_pretrained(tmp_path / "saved")
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["ice_text.model", "tokenizer_config.json"]
    loaded = ChatGLMTokenizer.from_pretrained(tmp_path / "saved")
    assert (loaded.num_image_tokens, loaded.mask_style, loaded.gmask_token_id) == (5, "padding", 996)
    text = "这件白色衬衫\n宽松"
    assert loaded.encode(text) == custom.encode(text)
    assert (tmp_path / "saved" / "ice_text.model").read_bytes() == (
        TOKENIZER_DIR / "ice_text.model"
    ).read_bytes()


def test_reads_the_original_config_and_ignores_remote_code(tmp_path):
    (tmp_path / "ice_text.model").write_bytes((TOKENIZER_DIR / "ice_text.model").read_bytes())
    original = {
        "name_or_path": "THUDM/chatglm-6b",
        "bos_token": "<sop>",
        "eop_token": "<eop>",
        "eos_token": "<eop>",
        "gmask_token": "[gMASK]",
        "mask_token": {"__type": "AddedToken", "content": "[MASK]", "lstrip": False, "rstrip": False},
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "remove_space": False,
        "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "num_image_tokens": 0,
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(original))
    loaded = ChatGLMTokenizer.from_pretrained(tmp_path)
    assert (loaded.mask_token_id, loaded.gmask_token_id, loaded.bos_token_id) == (MASK, GMASK, BOS)
    assert "auto_map" not in loaded.init_kwargs


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no ice_text\.model in .*nowhere"):
        ChatGLMTokenizer.from_pretrained(tmp_path / "nowhere")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="mask_style"):
        ChatGLMTokenizer.from_pretrained(TOKENIZER_DIR, mask_style="4d")
    with pytest.raises(ValueError, match=r"gmask_token '\[XMASK\]' is not a piece"):
        ChatGLMTokenizer.from_pretrained(TOKENIZER_DIR, gmask_token="[XMASK]")


def test_pickles_for_worker_processes(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("这件白色衬衫\n") == tok.encode("这件白色衬衫\n")
