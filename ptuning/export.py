"""Exports of a trained prefix: ``python -m ptuning.export {peft,original,full,from-peft} ...``.

* ``peft``: a peft ``PREFIX_TUNING`` adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
* ``original``: the family's original P-Tuning v2 prefix checkpoint (``pytorch_model.bin`` with the
  ``transformer.prefix_encoder.*`` keys, for ChatGLM-6B and ChatGLM2/3).
* ``full``: backbone and prefix in the family's original layout (ChatGLM-6B, ChatGLM2/3:
  ``pytorch_model-0000N-of-0000M.bin`` + index + original ``config.json``), with the base folder's code and
  tokenizer files copied beside them.
* ``from-peft``: a peft prefix adapter as one of our checkpoint folders (for ``train.init_prefix_from``,
  evaluation and the exports above).

The base model is ``--model`` (a folder or ``builtin:<name>``) or, by default, the one recorded in the
checkpoint's ``prefix_config.json``.

``--out`` must be a new or empty folder outside any checkpoint, model or training output folder: nothing the
user has is overwritten. The export is written beside it under a temporary name and renamed into place at the
end, so a refused or failed export leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .console import exit_on_interrupt

with exit_on_interrupt(__name__, "nothing was written"):  # Ctrl-C while the libraries load: one line
    import torch

    from .build import load_model
    from .checkpoint import (
        ORIGINAL_FILE,
        export_original,
        load_model_with_prefix,
        read_prefix,
        resolve_checkpoint,
    )
    from .config import (
        BUILTIN_SCHEME,
        PACKAGE_SCHEME,
        PROJECT_ROOT,
        ConfigError,
        ModelConfig,
        builtin_models,
        is_gguf_file,
    )
    from .interop.peft import export_peft_checkpoint, import_peft
    from .models import UnsupportedModelError, family_for, family_named, family_of, read_config
    from .weights import CheckpointError, is_disk_full

DTYPES = ("float16", "bfloat16", "float32")


def model_argument(model: str) -> Path:
    """``--model`` as a folder: ``builtin:<name>`` (a bundled model, as ``model.path`` takes it) or a path; or a
    ``.gguf`` file (also as ``package:<module>/<file>``).

    Raises:
        CheckpointError: no such built-in model, folder or file.
    """
    if model.startswith(PACKAGE_SCHEME):
        try:
            path = ModelConfig(path=model).resolved_path
        except ConfigError as err:
            raise CheckpointError(f"--model {err}") from None
        if not (is_gguf_file(path) or path.is_dir()):
            raise CheckpointError(f"--model {model}: no such file in the installed package ({path})")
        return path
    if is_gguf_file(model):
        return Path(model).expanduser()
    if model.startswith(BUILTIN_SCHEME):
        path = ModelConfig(path=model).resolved_path
        if not (path / "config.json").is_file():
            known = ", ".join(BUILTIN_SCHEME + name for name in builtin_models())
            raise CheckpointError(f"--model {model}: no such built-in model (expected one of {known}, or a model folder)")
        return path
    path = Path(model).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"--model {model}: not a folder (expected a model folder with config.json, or builtin:<name>)")
    return path


def base_model_path(checkpoint: str | None, model: str | None) -> Path | None:
    """``--model``, else the base model recorded with the checkpoint (None when neither says)."""
    if model is not None:
        return model_argument(model)
    if checkpoint is None:
        return None
    _, meta = read_prefix(checkpoint)
    recorded = (meta or {}).get("base_model")
    if recorded and recorded.startswith((BUILTIN_SCHEME, PACKAGE_SCHEME)):
        try:
            return ModelConfig(path=recorded).resolved_path
        except ConfigError:
            return None  # a package that is not installed here: as a folder that is not here
    if recorded and (Path(recorded).is_dir() or is_gguf_file(recorded)):
        return Path(recorded)
    return None


def parse_size(text: str) -> int:
    """``2GB``, ``500MB``, ``1GiB`` or a byte count (positive).

    Raises:
        argparse.ArgumentTypeError: not a positive size (argparse turns it into a one-line usage error).
    """
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    try:
        for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
            if upper.endswith(unit):
                size = int(float(upper[: -len(unit)]) * factor)
                break
        else:
            size = int(upper)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 2GB, 500MB or 1GiB") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive size")
    return size


def load_with_prefix(model_path: Path, checkpoint: str | None, dtype=None):
    """The base model with the checkpoint's prefix loaded (or no prefix without a checkpoint)."""
    if dtype is None:  # the base model's own dtype (float16 for the published checkpoints)
        raw = read_config(model_path)
        dtype = getattr(torch, str(raw.get("torch_dtype") or raw.get("dtype") or "float32"))
    cfg = ModelConfig(path=str(model_path), dtype=str(dtype).removeprefix("torch."))
    if checkpoint is None:
        return load_model(cfg, pre_seq_len=None)
    return load_model_with_prefix(cfg, checkpoint, tokenizer=False).model


def _config_of(model_path: Path | None):
    """The base model's config as its family reads it (None without a base model)."""
    if model_path is None:
        return None
    return family_for(model_path).model_config(model_path)


def refuse_unsupported(kind: str, checkpoint: str | None = None, model_path: Path | None = None) -> None:
    """Stops an export the model's family cannot carry (its one-line reason), before anything is written.

    The family is the base model folder's, else the one recorded in the checkpoint's ``prefix_config.json``.

    Raises:
        CheckpointError: the family refuses ``kind``.
    """
    family = None
    if model_path is not None:
        try:
            family = family_for(model_path)
        except UnsupportedModelError as err:
            raise CheckpointError(str(err)) from None
    elif checkpoint is not None:
        _, meta = read_prefix(checkpoint)
        if (meta or {}).get("family"):
            try:
                family = family_named(meta["family"])
            except UnsupportedModelError as err:
                raise CheckpointError(f"{checkpoint}: {err}") from None
    why = family.export_unsupported(kind) if family is not None else None
    if why and kind == "from-peft":
        raise CheckpointError(f"from-peft onto a {family.label} model ({model_path}): {why}")
    if why:
        raise CheckpointError(f"{kind} export of a {family.label} prefix: {why}")


# what marks a folder the export must not write into: a prefix checkpoint (ours, the original's, a peft
# adapter), a training output folder, a model folder
_CHECKPOINT_FILES = ("prefix.safetensors", "prefix_config.json", "adapter_config.json", "adapter_model.safetensors")
_RUN_FILES = ("run_config.json", "train_log.jsonl")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".model", ".pt")


def _what_folder(folder: Path) -> str | None:
    """``a checkpoint folder`` / ``a training output folder`` / ``a model folder``, or None for any other folder."""
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError:
        return None
    if names & set(_CHECKPOINT_FILES):
        return "a checkpoint folder"
    if names & set(_RUN_FILES):
        return "a training output folder"
    if "config.json" in names and ("tokenizer.json" in names or any(n.endswith(_WEIGHT_SUFFIXES) for n in names)):
        return "a model folder"
    return None


def check_out(out: Path, writer: str = "an export") -> None:
    """Refuses an ``--out`` that holds anything, or that lies in a checkpoint, model or training output folder.

    Args:
        writer: what writes the folder, for the message (``"a conversion"`` in ``python -m ptuning.convert``).

    Raises:
        CheckpointError: one line naming ``--out`` and what is there.
    """
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out}: exists and is not a folder; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        what = _what_folder(out)
        raise CheckpointError(
            f"--out {out}: {'is ' + what if what else 'the folder is not empty'}; give a new or empty folder "
            f"({writer} never overwrites or adds to what is there)"
        )
    resolved = out.resolve()
    for folder in resolved.parents:
        what = _what_folder(folder)
        if what:
            raise CheckpointError(f"--out {out}: lies inside {folder}, {what}; give a folder outside it")


@contextmanager
def new_folder(out: Path, writer: str = "an export") -> Iterator[Path]:
    """A temporary folder beside ``out`` to write the export into; renamed to ``out`` when the block ends
    without an error, removed (with any parent folders made for it) when it raises (``writer``: as
    :func:`check_out` names it)."""
    check_out(out, writer)
    made = []
    parent = out.resolve().parent
    while not parent.exists():
        made.append(parent)
        parent = parent.parent
    try:
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.resolve().parent))
    except OSError as err:
        for folder in made:  # innermost first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise CheckpointError(f"--out {out}: cannot create it ({err.strerror or err})") from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if out.is_dir():  # an empty folder the user made for it
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def recorded_name(model_path: Path) -> str:
    """How a checkpoint names the base model: ``builtin:<name>`` for a bundled one, else the absolute path."""
    resolved = model_path.resolve()
    builtin = resolved.parent == (PROJECT_ROOT / "data").resolve() and resolved.name.startswith("tiny-")
    return BUILTIN_SCHEME + resolved.name if builtin else str(resolved)


def check_adapter_family(adapter: str, model_path: Path) -> None:
    """Refuses a peft adapter made for a model of another family than ``--model`` (as far as the adapter's
    ``base_model_name_or_path`` names a model folder found here).

    Raises:
        CheckpointError: one line naming both families.
    """
    try:
        recorded = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
        named = recorded.get("base_model_name_or_path") if isinstance(recorded, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # read_peft_adapter reports it
    if not isinstance(named, str) or not named:
        return
    folder = ModelConfig(path=named).resolved_path if named.startswith(BUILTIN_SCHEME) else Path(named).expanduser()
    if not (folder / "config.json").is_file():
        return
    try:
        theirs, mine = family_for(folder), family_for(model_path)
    except UnsupportedModelError:
        return
    if theirs.name != mine.name:
        raise CheckpointError(
            f"{adapter}: the adapter was made for {named}, a {theirs.label} model, but --model {model_path} is a "
            f"{mine.label} model"
        )


def main(argv=None) -> int:
    """``python -m ptuning.export``. Returns 0, 2 after a one-line ``error: ...`` on stderr, or 130 after Ctrl-C
    (the export's temporary folder is removed: nothing is written)."""
    try:
        return export(argv)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m ptuning.export``."""
    parser = argparse.ArgumentParser(prog="python -m ptuning.export", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("peft", help="a peft PREFIX_TUNING adapter folder")
    p.add_argument("--checkpoint", required=True,
                   help="a prefix checkpoint folder (ours or the original's), or a training output folder (its latest)")
    p.add_argument("--out", required=True)
    p.add_argument("--model", help="the base model folder (needed for original-format checkpoints)")
    p = sub.add_parser("original", help="the original P-Tuning v2 prefix checkpoint (pytorch_model.bin)")
    p.add_argument("--checkpoint", required=True, help="a prefix checkpoint folder, or a training output folder (its "
                   "latest)")
    p.add_argument("--out", required=True)
    p = sub.add_parser("full", help="backbone + prefix in the original pytorch_model-*.bin + index layout")
    p.add_argument("--checkpoint", help="a prefix checkpoint folder, or a training output folder (its latest); omit "
                   "to convert the base model alone")
    p.add_argument("--out", required=True)
    p.add_argument("--model", help="the base model folder (default: the one the checkpoint records)")
    p.add_argument("--dtype", choices=DTYPES, help="saved backbone dtype (default: the base model's)")
    p.add_argument("--max-shard-size", default="2GB", type=parse_size,
                   help="largest shard, e.g. 2GB, 500MB (default 2GB)")
    p = sub.add_parser("from-peft", help="a peft prefix adapter as one of our checkpoint folders")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", help="the base model folder, to check the adapter fits it")
    return parser


def export(argv=None) -> int:
    """Parses the command line and writes the export (see :func:`main`)."""
    args = build_parser().parse_args(argv)
    out = Path(args.out).expanduser()
    tmp = None  # the folder the export is written into, once it exists
    try:
        if args.kind == "from-peft":
            model_path = model_argument(args.model) if args.model else None
            refuse_unsupported(args.kind, model_path=model_path)
            if model_path is not None:
                check_adapter_family(args.adapter, model_path)
        else:
            if args.checkpoint is not None:  # a checkpoint folder, or a run folder: its latest (as evaluate, chat, serve)
                args.checkpoint = str(resolve_checkpoint(args.checkpoint, key="--checkpoint"))
            model_path = base_model_path(args.checkpoint, getattr(args, "model", None))
            refuse_unsupported(args.kind, args.checkpoint, model_path)
        if args.kind == "full" and model_path is None:
            raise CheckpointError(
                "full: give the base model with --model (the checkpoint records none that exists here)"
            )
        with new_folder(out) as tmp:
            if args.kind == "peft":
                export_peft_checkpoint(
                    args.checkpoint,
                    tmp,
                    _config_of(model_path),
                    base_model_name_or_path=str(model_path) if model_path else None,
                )
                done = f"wrote the peft adapter {out} (adapter_config.json, adapter_model.safetensors)"
            elif args.kind == "original":
                export_original(args.checkpoint, tmp)
                done = f"wrote {out / ORIGINAL_FILE}"
            elif args.kind == "full":
                dtype = getattr(torch, args.dtype) if args.dtype else None
                model = load_with_prefix(model_path, args.checkpoint, dtype)
                paths = family_of(model).export_full(
                    model,
                    tmp,
                    dtype=dtype,
                    max_shard_bytes=args.max_shard_size,
                    companions_from=model_path,
                )
                done = f"wrote {len(paths)} shard(s), pytorch_model.bin.index.json and config.json to {out}"
            else:
                recorded = recorded_name(model_path) if model_path is not None else None
                import_peft(args.adapter, tmp, _config_of(model_path), base_model=recorded)
                done = f"wrote the prefix checkpoint {out} (prefix.safetensors, prefix_config.json)"
        print(done)
    except (CheckpointError, ConfigError, UnsupportedModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a write into the export's folder failed: that folder is removed already
        line = write_error(err, tmp, out)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    return 0


def write_error(err: OSError, tmp: Path | None, out: Path) -> str | None:
    """The line of an export whose write into ``tmp`` (the folder renamed to ``out`` at the end, removed when
    a write failed) failed: the file under its final name, and why. None when ``err`` is not such a write."""
    if tmp is None:
        return None
    writing = out
    if err.filename:
        try:
            writing = out / Path(err.filename).resolve().relative_to(tmp.resolve())
        except ValueError:
            return None
    if is_disk_full(err):
        return (f"no space left on device writing {writing}; the partial export was removed ({out} is not written); "
                "free space and run the export again")
    return f"cannot write {writing} ({err.strerror or err}); the partial export was removed ({out} is not written)"


if __name__ == "__main__":
    sys.exit(main())
