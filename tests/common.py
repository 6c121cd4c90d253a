"""Helpers shared by the tests: where the parity sets and assets are."""

from __future__ import annotations

import json
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
PARITY_DIRS = [ASSETS / "parity", ROOT.parent / "shared" / "parity"]
GLM2_PARITY_DIRS = [ASSETS / "parity-glm2", ROOT.parent / "shared" / "parity-glm2"]


def parity_sets(dirs: list[Path] = PARITY_DIRS) -> list[Path]:
    """Every parity folder (``config.json`` + ``vectors.safetensors``) under ``dirs``, shipped copies first.

    Sets that exist only beside the checkout (``../shared/parity``, ``../shared/parity-glm2``) are included
    too, so new sets of the same format are tested without code changes.
    """
    found: dict[str, Path] = {}
    for base in dirs:
        if base.is_dir():
            for sub in sorted(base.iterdir()):
                if (sub / "vectors.safetensors").is_file() and sub.name not in found:
                    found[sub.name] = sub
    return list(found.values())


def read_cases(folder: Path) -> dict:
    return json.loads((folder / "cases.json").read_text())


def read_wandb_history(run_file: Path) -> list[dict]:
    """The logged rows of a wandb ``.wandb`` run file (a LevelDB-style log of protobuf records), as dicts."""
    from wandb.proto import wandb_internal_pb2

    raw = Path(run_file).read_bytes()
    assert raw[:4] == b":W&B", run_file
    block, pos, chunks, rows = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full / first
            chunks = data
        elif kind in (3, 4):  # middle / last
            chunks += data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows
