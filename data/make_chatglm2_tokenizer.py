"""Train the bundled small ChatGLM2/3-style tokenizer: ``data/tokenizer-chatglm2/`` and ``data/tokenizer-chatglm3/``.

The SentencePiece model is laid out like the real ``tokenizer.model`` of chatglm2-6b / chatglm3-6b (which is
the same file for both), only smaller:

* ``<unk>`` 0 (also the pad), ``<s>`` 1 (unused), ``</s>`` 2 (eos), no pad piece;
* BPE with byte fallback (any text round-trips), identity normalization, whitespace kept, digits split,
  SentencePiece's dummy prefix ``▁`` (so ``"\\n"`` encodes as ``▁`` + ``<0x0A>``, as in the real model);
* no GLM token inside: ``[MASK] [gMASK] [sMASK] sop eop`` (and ChatGLM3's ``<|system|> <|user|> <|assistant|>
  <|observation|>``) are the tokenizer's own ids right after the pieces.

With the default ``--vocab-size 1000`` the GLM tokens are 1000..1004 (``[gMASK]`` 1001, ``sop`` 1003) and
ChatGLM3's role tokens 1005..1008 (``<|user|>`` 1006, ``<|assistant|>`` 1007); the built-in tiny models
pad their vocabulary to 1024 rows. The two folders differ only in ``tokenizer_config.json``
(``chatglm_version``). Deterministic for a given corpus. Run from the repository root after
``data/make_adgen_sample.py``::

    python data/make_chatglm2_tokenizer.py
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import sentencepiece as spm

DATA_DIR = Path(__file__).resolve().parent
# the templates' fixed text, so that it gets pieces of its own (newlines stay byte pieces, as in the real model)
TEMPLATE_LINES = ["[Round 1]", "[Round 2]", "[Round 3]", "问：", "答："]


def corpus_lines(path: Path) -> list[str]:
    """The ``content`` and ``summary`` texts of an ADGEN-format JSON-lines file, and the template text."""
    lines = list(TEMPLATE_LINES)
    with path.open(encoding="utf-8") as source:
        for line in source:
            record = json.loads(line)
            lines += [record["content"], record["summary"]]
    return lines


def train_tokenizer_model(sentences: list[str], vocab_size: int) -> bytes:
    """A BPE SentencePiece model with the real ChatGLM2 tokenizer's options (see the module)."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,  # the merges never depend on scheduling
        minloglevel=2,
    )
    return buffer.getvalue()


def write_folder(out: Path, model: bytes, version: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model)
    config = {
        "tokenizer_class": "ChatGLMTokenizer",
        "chatglm_version": version,
        "padding_side": "left",
        "eos_token": "</s>",
        "pad_token": "<unk>",
        "unk_token": "<unk>",
        "remove_space": False,
        "do_lower_case": False,
        "clean_up_tokenization_spaces": False,
    }
    if version == 3:
        config["encode_special_tokens"] = False
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DATA_DIR / "adgen_sample" / "train.json")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="writes tokenizer-chatglm2/ and tokenizer-chatglm3/ here")
    parser.add_argument("--vocab-size", type=int, default=1000, help="SentencePiece pieces; the GLM tokens follow")
    args = parser.parse_args(argv)
    model = train_tokenizer_model(corpus_lines(args.corpus), args.vocab_size)
    for version in (2, 3):
        write_folder(args.out / f"tokenizer-chatglm{version}", model, version)
    print(f"wrote {args.out}/tokenizer-chatglm2 and tokenizer-chatglm3: {args.vocab_size} pieces + 5 / + 9 GLM tokens")


if __name__ == "__main__":
    main()
