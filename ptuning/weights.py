"""Reading and writing ChatGLM-6B weight folders in every layout the original and HF use.

A folder holds ``config.json`` and one of: ``model.safetensors``; sharded safetensors with
``model.safetensors.index.json``; ``pytorch_model.bin``; sharded ``pytorch_model-*.bin`` with
``pytorch_model.bin.index.json``. ``.bin`` files are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import io
import json
import mmap
import os
import pickle
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
GGUF_SUFFIX = ".gguf"  # llama.cpp's single-file models (config, tokenizer, weights): ptuning.models.hf.gguf



def is_gguf_file(path: str | os.PathLike) -> bool:
    """``path`` is an existing ``.gguf`` file (a single-file model: config, tokenizer and weights)."""
    path = Path(path).expanduser()
    return path.suffix.lower() == GGUF_SUFFIX and path.is_file()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a (model) file, its first 16 hex digits, computed once per file and process (a 100 MB file:
    ~0.3 s); a file changed since (size or modification time) is hashed again."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return _cached_sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


SOURCE_FILE = "converted_from.json"  # what a model folder was converted from (python -m ptuning.convert)


def _stamps(folder: Path) -> dict[str, list[int]]:
    """``{weight file: [bytes, modification time in ns]}`` of a model folder."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in weight_files(folder)}


def write_source_record(folder: str | os.PathLike, source: str, sha256: str) -> None:
    """Records in ``folder`` (a model folder just written from the model file ``source``, named as checkpoints
    name it) the source's weights digest (:func:`file_sha256`) with the size and modification time of each
    weight file written, so that :func:`recorded_source_digest` can tell the folder is still those weights."""
    record = {"source": source, "sha256": sha256, "weight_files": _stamps(Path(folder))}
    (Path(folder) / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def recorded_source_digest(folder: str | os.PathLike) -> str | None:
    """The weights digest of the file a model folder was converted from (:func:`write_source_record`), or
    None: no record, an unreadable one, or weight files changed since (another size or modification time:
    a folder re-saved or copied without keeping times is named by its path again)."""
    try:
        record = json.loads((Path(folder) / SOURCE_FILE).read_text(encoding="utf-8"))
        if record["weight_files"] == _stamps(Path(folder)) and isinstance(record["sha256"], str):
            return record["sha256"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, CheckpointError):
        pass
    return None


# Stored by the original checkpoint but recomputed by the model.
IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A weights folder or file that cannot be loaded into the model; the message names what and why."""


# ---- writing files: a failed write is an OSError that names the file and says why ----

#: ``errno`` of a write that found no room: the device is full, or the user's disk quota is used up
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is a write that found no space left (ENOSPC, or EDQUOT: over the disk quota)."""
    return isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS


class _Sink(io.RawIOBase):
    """A file that keeps the error of a failed write: ``torch.save`` turns it into a RuntimeError that says
    only ``unexpected pos ...``."""

    def __init__(self, fh):
        super().__init__()
        self.fh, self.error = fh, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = err
            raise


def save_torch(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` into the file ``path`` (streamed, as torch.save writes it).

    Raises:
        OSError: the write failed (``errno`` ENOSPC on a full disk), naming ``path``.
    """
    with open(path, "wb") as fh:
        sink = _Sink(fh)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise OSError(sink.error.errno, sink.error.strerror, str(path)) from None
            raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors' ``save_file``.

    Raises:
        OSError: the write failed (``errno`` ENOSPC on a full disk), naming ``path``; safetensors reports it as
            ``SafetensorError: ... (os error 28)``.
    """
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def load_failure(err: BaseException, *, torch_file: bool = False) -> str:
    """One line saying why a reader refused a file (torch and safetensors messages span many lines).

    Args:
        torch_file: ``err`` came from ``torch.load``: anything but a refused Python object means the file is
            not a readable PyTorch checkpoint (torch's own text, about mmap or miniz, does not say so).
    """
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) and (not torch_file or re.search("global", text, re.I)):
        # torch.load(weights_only=True) met an object that is not a tensor or plain container: name it
        # and say that nothing ran (the generic advice to pass weights_only=False is exactly wrong here)
        detail = next((line for line in text.splitlines() if "GLOBAL" in line or "global" in line), "")
        return (
            f"it holds Python objects that the safe loader (torch.load weights_only=True) refuses, "
            f"so nothing in it was run{': ' + detail.strip() if detail else ''}"
        )
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if len(first) > 160:  # torch appends paragraphs of advice: the first sentence says what is wrong
        first = first.split(". ")[0]
    if torch_file:
        if isinstance(err, NotZipArchive):
            return ("not a readable PyTorch checkpoint: not the zip archive torch.save writes (damaged, or another "
                    "kind of file; one saved by torch < 1.6 must be saved again with a newer torch)")
        return f"not a readable PyTorch checkpoint: damaged or cut short ({type(err).__name__}: {first[:160]})"
    return f"{type(err).__name__}: {first[:300]}"


class NotZipArchive(ValueError):
    """A ``.bin`` file that does not start as the zip archive torch.save writes."""


def torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True, mmap=True)`` on the CPU.

    Raises:
        NotZipArchive: the file is not torch.save's zip archive (the only format that can be memory-mapped).
        Exception: torch's, for a damaged archive or a refused object (see :func:`load_failure` with
            ``torch_file=True``).
    """
    with open(path, "rb") as handle:
        if handle.read(4) != b"PK\x03\x04":
            raise NotZipArchive(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of ``folder`` in load order, whichever layout it uses."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory (expected a model folder with config.json and weights)")
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a valid index (expected a JSON object with 'weight_map'): {err}") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise CheckpointError(f"{index}: lists shard(s) that are missing from {folder}: {', '.join(missing)}")
            return [folder / f for f in files]
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(
        f"{folder}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})"
    )


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """One weights file as a state dict: safetensors, or a pickle read with ``weights_only=True``."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch_load(path)
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad file for the user
        why = load_failure(err, torch_file=path.suffix != ".safetensors")
        raise CheckpointError(f"{path}: cannot read weights ({why})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


# bytes of a memory-mapped tensor converted (and its file pages released) at a time
CONVERT_SLICE_BYTES = 16 * 2**20


def _drop_file_pages(tensor: torch.Tensor) -> None:
    """Tells the kernel this process no longer needs the pages wholly inside ``tensor``'s bytes (``madvise``
    ``MADV_DONTNEED``). Only for a tensor read from a memory-mapped weights file (``torch.load(mmap=True)``
    maps it privately and never writes to it): the pages leave the RSS and would be read from the file again
    if touched. Pages shared with a neighbouring tensor are kept. A no-op where ``madvise`` is unavailable."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    begin = tensor.data_ptr()
    start = -(-begin // page) * page
    end = (begin + tensor.numel() * tensor.element_size()) // page * page
    if end > start:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def converted(tensor: torch.Tensor, dtype: torch.dtype, *, mapped: bool) -> torch.Tensor:
    """``tensor.to(dtype)`` for loading. For a tensor of a memory-mapped shard (``mapped``; what
    :func:`read_weights` makes of ``.bin`` files) of another dtype, the copy is made in slices of
    :data:`CONVERT_SLICE_BYTES`, each slice's file pages released once read (:func:`_drop_file_pages`): the
    pages of a shard never pile up in memory next to their converted copy, so loading a checkpoint holds its
    weights once (ChatGLM-6B: float16 shards of up to 1.9 GB read as bfloat16). A tensor already in ``dtype``
    is returned as it is (its pages stay mapped: they are the weights)."""
    if tensor.dtype == dtype or not mapped or not tensor.is_contiguous():
        return tensor.to(dtype)
    out = torch.empty(tensor.shape, dtype=dtype)
    src, dst = tensor.view(-1), out.view(-1)
    step = max(1, CONVERT_SLICE_BYTES // tensor.element_size())
    for start in range(0, src.numel(), step):
        dst[start : start + step].copy_(src[start : start + step])
        _drop_file_pages(src[start : start + step])
    return out


def iter_shards(folder: str | os.PathLike) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """Yields ``(file, state_dict)`` for every shard of ``folder``, one at a time (bounded memory). The tensors of
    a ``.bin`` shard are memory-mapped (see :func:`converted`)."""
    for path in weight_files(folder):
        yield path, read_weights(path)


def read_matching(folder: str | os.PathLike, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Only the tensors of a weights folder whose keys ``keep`` accepts, reading no other tensor: with an index
    only the shards it lists for such keys are opened, safetensors files are read key by key, ``.bin`` files
    are memory-mapped (``torch.load(mmap=True, weights_only=True)``) so only those tensors come from disk.
    E.g. the prefix of a 12 GB whole-model P-Tuning checkpoint.

    Raises:
        CheckpointError: no weights, or an unreadable file (names it).
    """
    folder = Path(folder)
    files = weight_files(folder)
    for index_name in (SAFE_INDEX, BIN_INDEX):
        if (folder / index_name).is_file():
            weight_map = json.loads((folder / index_name).read_text())["weight_map"]
            wanted = {f for k, f in weight_map.items() if keep(k)}
            files = [f for f in files if f.name in wanted]
            break
    found: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                        if keep(key):
                            found[key] = handle.get_tensor(key)
            else:
                state = torch_load(path)
                if not isinstance(state, dict):
                    raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
                found.update({k: v.clone() for k, v in state.items() if keep(k)})
                del state
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - any reader failure is a bad file for the user
            why = load_failure(err, torch_file=path.suffix != ".safetensors")
            raise CheckpointError(f"{path}: cannot read weights ({why})") from None
    return found


def save_weights(
    state: dict[str, torch.Tensor],
    folder: str | os.PathLike,
    *,
    safe: bool = True,
    max_shard_bytes: int | None = None,
) -> list[Path]:
    """Writes ``state`` as one file or as shards plus an index, in the HF/original layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes

    def write(part: dict[str, torch.Tensor], path: Path) -> None:
        if safe:
            save_safetensors(part, path, metadata={"format": "pt"})
        else:
            save_torch(part, path)

    if len(shards) == 1:
        path = folder / (SAFE_SINGLE if safe else BIN_SINGLE)
        write(shards[0], path)
        return [path]
    total = len(shards)
    stem, ext = ("model", "safetensors") if safe else ("pytorch_model", "bin")
    weight_map, paths = {}, []
    for i, part in enumerate(shards, start=1):
        name = f"{stem}-{i:05d}-of-{total:05d}.{ext}"
        write(part, folder / name)
        paths.append(folder / name)
        weight_map.update({key: name for key in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}, "weight_map": weight_map}
    (folder / (SAFE_INDEX if safe else BIN_INDEX)).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return paths
