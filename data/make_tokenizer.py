"""Train the bundled small ChatGLM-style tokenizer: ``data/tokenizer/{ice_text.model,tokenizer_config.json}``.

The SentencePiece model is laid out like the real ``ice_text.model`` of chatglm-6b, only smaller:

* ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3, then ``<n>`` 4 (the newline stand-in);
* user-defined pieces ``<|tab|>`` and ``<|blank_2|>`` .. ``<|blank_80|>`` (the tokenizer rewrites tabs
  and runs of spaces into these before encoding);
* 256 byte pieces, so that any text round-trips even with characters never seen in training;
* the learned pieces;
* last, the eight special tokens ``[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>``,
  appended as user-defined pieces after the trained vocabulary, as the real model has them at
  130000..130007.

With the default ``--vocab-size 990`` the specials land on 990..997 (``[MASK]`` 990, ``[gMASK]`` 991,
``<sop>`` 994, ``<eop>`` 995): the ids of ``ptuning.models.chatglm.tiny_config()`` and of the parity models, and
the total vocabulary is 998. The result is deterministic for a given corpus. Run from the repository
root after ``data/make_adgen_sample.py``::

    python data/make_tokenizer.py
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_model

SPECIAL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
WHITESPACE_TOKENS = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]

DATA_DIR = Path(__file__).resolve().parent


def train_ice_text(sentences: Iterable[str], vocab_size: int) -> bytes:
    """Train a BPE SentencePiece model and append the ChatGLM special tokens.

    BPE rather than unigram: on a corpus this small and repetitive the unigram trainer cannot find
    enough distinct pieces for ~1,000 entries, while BPE keeps merging the frequent phrases.

    Args:
        sentences: training text, one sentence per item.
        vocab_size: size of the trained model, reserved pieces included; the specials come after it.

    Returns:
        The serialized model (``ice_text.model`` bytes), ``vocab_size + 8`` pieces.
    """
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        # exact round trips: no NFKC folding, spaces kept as they are (runs become <|blank_N|>)
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        user_defined_symbols=WHITESPACE_TOKENS,
        num_threads=1,  # one thread: the piece counts, hence the merges, never depend on scheduling
        minloglevel=2,
    )
    model = sp_model.ModelProto()
    model.ParseFromString(buffer.getvalue())
    for token in SPECIAL_TOKENS:
        piece = model.pieces.add()
        piece.piece = token
        piece.score = 0.0
        piece.type = sp_model.ModelProto.SentencePiece.USER_DEFINED
    return model.SerializeToString()


def corpus_lines(path: Path) -> list[str]:
    """The ``content`` and ``summary`` texts of an ADGEN-format JSON-lines file."""
    lines = []
    with path.open(encoding="utf-8") as source:
        for line in source:
            record = json.loads(line)
            lines += [record["content"], record["summary"]]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DATA_DIR / "adgen_sample" / "train.json")
    parser.add_argument("--out", type=Path, default=DATA_DIR / "tokenizer")
    parser.add_argument("--vocab-size", type=int, default=990, help="trained pieces; the 8 specials follow")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ice_text.model").write_bytes(train_ice_text(corpus_lines(args.corpus), args.vocab_size))
    config = {
        "tokenizer_class": "ChatGLMTokenizer",
        "num_image_tokens": 0,
        "bos_token": "<sop>",
        "eos_token": "<eop>",
        "mask_token": "[MASK]",
        "gmask_token": "[gMASK]",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "padding_side": "left",
        "do_lower_case": False,
        "remove_space": False,
    }
    (args.out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {args.vocab_size + len(SPECIAL_TOKENS)} pieces")


if __name__ == "__main__":
    main()
