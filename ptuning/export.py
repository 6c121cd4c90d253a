"""Exports of a trained prefix: ``python -m ptuning.export {peft,original,full,from-peft} ...``.

* ``peft``: a peft ``PREFIX_TUNING`` adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
* ``original``: the family's original P-Tuning v2 prefix checkpoint (``pytorch_model.bin`` with the
  ``transformer.prefix_encoder.*`` keys, for ChatGLM-6B and ChatGLM2/3).
* ``full``: backbone and prefix in the family's original layout (ChatGLM-6B, ChatGLM2/3:
  ``pytorch_model-0000N-of-0000M.bin`` + index + original ``config.json``), with the base folder's code and
  tokenizer files copied beside them.
* ``from-peft``: a peft prefix adapter as one of our checkpoint folders (for ``train.init_prefix_from``,
  evaluation and the exports above).

The base model is ``--model`` or, by default, the one recorded in the checkpoint's ``prefix_config.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import BUILTIN_SCHEME, PROJECT_ROOT, ModelConfig
from .weights import CheckpointError

DTYPES = ("float16", "bfloat16", "float32")


def base_model_path(checkpoint: str | None, model: str | None) -> Path | None:
    """``--model``, else the base model recorded with the checkpoint (None when neither says)."""
    if model is not None:
        return Path(model).expanduser()
    if checkpoint is None:
        return None
    from .training.checkpoint import read_prefix

    _, meta = read_prefix(checkpoint)
    recorded = (meta or {}).get("base_model")
    if recorded and recorded.startswith(BUILTIN_SCHEME):
        return ModelConfig(path=recorded).resolved_path
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    return None


def parse_size(text: str) -> int:
    """``2GB``, ``500MB``, ``1GiB`` or a byte count."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def load_with_prefix(model_path: Path, checkpoint: str | None, dtype=None):
    """The base model with the checkpoint's prefix loaded (or no prefix without a checkpoint)."""
    import torch

    from .build import load_model
    from .training.checkpoint import infer_prefix_shape, load_prefix, read_prefix

    if dtype is None:  # the base model's own dtype (float16 for the published checkpoints)
        from .models import read_config

        raw = read_config(model_path)
        dtype = getattr(torch, str(raw.get("torch_dtype") or raw.get("dtype") or "float32"))
    cfg = ModelConfig(path=str(model_path), dtype=str(dtype).removeprefix("torch."))
    if checkpoint is None:
        return load_model(cfg, pre_seq_len=None)
    prefix, meta = read_prefix(checkpoint)
    shape = {k: meta[k] for k in ("pre_seq_len", "prefix_projection")} if meta else infer_prefix_shape(prefix)
    cfg.pre_seq_len, cfg.prefix_projection = shape["pre_seq_len"], shape["prefix_projection"]
    model = load_model(cfg)
    load_prefix(model, checkpoint)
    return model


def _config_of(model_path: Path | None):
    if model_path is None:
        return None
    from .models.chatglm import ChatGLMConfig

    return ChatGLMConfig.from_pretrained(str(model_path))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptuning.export", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("peft", help="a peft PREFIX_TUNING adapter folder")
    p.add_argument("--checkpoint", required=True, help="a prefix checkpoint folder (ours or the original's)")
    p.add_argument("--out", required=True)
    p.add_argument("--model", help="the base model folder (needed for original-format checkpoints)")
    p = sub.add_parser("original", help="the original P-Tuning v2 prefix checkpoint (pytorch_model.bin)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("full", help="backbone + prefix in the original pytorch_model-*.bin + index layout")
    p.add_argument("--checkpoint", help="a prefix checkpoint folder (omit to convert the base model alone)")
    p.add_argument("--out", required=True)
    p.add_argument("--model", help="the base model folder (default: the one the checkpoint records)")
    p.add_argument("--dtype", choices=DTYPES, help="saved backbone dtype (default: the base model's)")
    p.add_argument("--max-shard-size", default="2GB", help="largest shard, e.g. 2GB, 500MB (default 2GB)")
    p = sub.add_parser("from-peft", help="a peft prefix adapter as one of our checkpoint folders")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", help="the base model folder, to check the adapter fits it")
    args = parser.parse_args(argv)

    try:
        if args.kind == "peft":
            from .interop.peft import export_peft_checkpoint

            model_path = base_model_path(args.checkpoint, args.model)
            out = export_peft_checkpoint(
                args.checkpoint,
                args.out,
                _config_of(model_path),
                base_model_name_or_path=str(model_path) if model_path else None,
            )
            print(f"wrote the peft adapter {out} (adapter_config.json, adapter_model.safetensors)")
        elif args.kind == "original":
            from .training.checkpoint import export_original

            print(f"wrote {export_original(args.checkpoint, args.out)}")
        elif args.kind == "full":
            import torch

            from .models import family_of

            model_path = base_model_path(args.checkpoint, args.model)
            if model_path is None:
                parser.error(
                    "full: give the base model with --model (the checkpoint records none that exists here)"
                )
            dtype = getattr(torch, args.dtype) if args.dtype else None
            model = load_with_prefix(model_path, args.checkpoint, dtype)
            paths = family_of(model).export_full(
                model,
                Path(args.out),
                dtype=dtype,
                max_shard_bytes=parse_size(args.max_shard_size),
                companions_from=model_path,
            )
            print(f"wrote {len(paths)} shard(s), pytorch_model.bin.index.json and config.json to {args.out}")
        else:
            from .interop.peft import import_peft

            model_path = Path(args.model).expanduser() if args.model else None
            recorded = None
            if model_path is not None:
                resolved = model_path.resolve()
                builtin = resolved.parent == (PROJECT_ROOT / "data").resolve() and resolved.name.startswith("tiny-")
                recorded = BUILTIN_SCHEME + resolved.name if builtin else str(resolved)
            out = import_peft(args.adapter, args.out, _config_of(model_path), base_model=recorded)
            print(f"wrote the prefix checkpoint {out} (prefix.safetensors, prefix_config.json)")
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
