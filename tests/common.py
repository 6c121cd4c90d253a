"""Helpers shared by the tests: where the parity sets and assets are."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
PARITY_DIRS = [ASSETS / "parity", ROOT.parent / "shared" / "parity"]


def parity_sets() -> list[Path]:
    """Every parity folder (``config.json`` + ``vectors.safetensors``), shipped copies first.

    Sets that exist only beside the checkout (``../shared/parity``) are included too, so new sets of the
    same format are tested without code changes.
    """
    found: dict[str, Path] = {}
    for base in PARITY_DIRS:
        if base.is_dir():
            for sub in sorted(base.iterdir()):
                if (sub / "vectors.safetensors").is_file() and sub.name not in found:
                    found[sub.name] = sub
    return list(found.values())


def read_cases(folder: Path) -> dict:
    return json.loads((folder / "cases.json").read_text())
