"""``python -m ptuning.convert gguf FILE --out FOLDER``: a single-file GGUF model (llama.cpp's format) as an
ordinary transformers model folder.

The file is read by transformers' GGUF loader and de-quantized (:mod:`ptuning.models.hf.gguf`); the folder
gets ``config.json`` (with ``architectures``, which a GGUF config lacks), ``generation_config.json``, the
weights as ``model.safetensors`` (sharded above ``--max-shard-size``) and the tokenizer with its chat template
(``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``), and ``converted_from.json`` (the
file's name and weights digest: a prefix trained on the file goes into the folder without a warning). Every
command takes the ``.gguf`` file itself as ``model.path`` too; the folder starts in about a second, where the file is parsed and
de-quantized at every start (tens of seconds for SmolLM2-135M on a small CPU).

``FILE`` may be ``package:<module>/<file>`` (a file of an installed package, as ``model.path`` takes it). The
output is written to a temporary folder beside ``--out`` and renamed when complete; ``--out`` must be new or
empty, and is never written into otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .config import DTYPES, ConfigError, ModelConfig, is_gguf_file
from .export import check_out, new_folder, parse_size
from .models.hf.gguf import gguf_model_config, load_gguf_causal_lm, load_gguf_tokenizer
from .weights import CheckpointError, file_sha256, write_source_record


def gguf_file(text: str) -> Path:
    """The ``.gguf`` file a ``FILE`` argument names (a path or ``package:<module>/<file>``).

    Raises:
        CheckpointError: no such file, or not a ``.gguf`` file.
    """
    try:
        path = ModelConfig(path=text).resolved_path
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    if not is_gguf_file(path):
        what = "no such file" if not path.exists() else "not a .gguf file"
        raise CheckpointError(f"{text}: {what} (expected a GGUF model file, *.gguf)")
    return path


def convert_gguf(source: Path, out: Path, *, dtype: str = "float32", max_shard_bytes: int = 2 * 10**9,
                 name: str | None = None) -> list[str]:
    """Writes the GGUF model ``source`` as a transformers folder ``out`` (see the module). Returns the names of
    the files written.

    Args:
        name: how checkpoints name ``source`` (``package:<module>/<file>``; default its path): recorded with
            the file's weights digest in ``converted_from.json`` (:func:`~ptuning.weights.write_source_record`),
            so a prefix trained on the file goes into the folder without a base model warning, and back.

    Raises:
        CheckpointError: the file cannot be loaded, or ``out`` is not a new or empty folder.
    """
    check_out(out, "a conversion")  # before the (slow) load: a folder in the way fails at once
    gguf_model_config(source)  # a file that is no GGUF model says so first (not "no tokenizer")
    tokenizer = load_gguf_tokenizer(source)
    model = load_gguf_causal_lm(source, dtype=getattr(torch, dtype))
    with new_folder(out, "a conversion") as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_bytes)
        tokenizer.save_pretrained(tmp)
        write_source_record(tmp, name or str(source.resolve()), file_sha256(source))
        names = sorted(p.name for p in tmp.iterdir())
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptuning.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("gguf", help="a .gguf model file as a transformers model folder (safetensors)")
    p.add_argument("file", help="the .gguf file, or package:<module>/<file> (a file of an installed package)")
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype of the saved weights (default float32: the de-quantized values exactly)")
    p.add_argument("--max-shard-size", default="2GB", type=parse_size, help="largest shard, e.g. 2GB, 500MB")
    args = parser.parse_args(argv)
    try:
        source = gguf_file(args.file)
        out = Path(args.out).expanduser()
        names = convert_gguf(source, out, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                             name=ModelConfig(path=args.file).base_model_name)
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({', '.join(names)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
