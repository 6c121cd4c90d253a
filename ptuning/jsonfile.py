"""Reading the small JSON files of model folders and checkpoints (``config.json``, ``tokenizer_config.json``,
``prefix_config.json`` ...) with the one-line error every reader gives."""

from __future__ import annotations

import json
from pathlib import Path


def read_json_object(path: str | Path, error: type[Exception] = ValueError, what: str | None = None) -> dict:
    """The JSON object stored in ``path``.

    Args:
        error: the exception class to raise (the caller's: ``CheckpointError``, ``UnsupportedModelError`` ...).
        what: what the object holds, for the message (``prefix metadata`` -> ``expected the prefix metadata
            object``); None says only that it is not valid JSON / not an object.

    Raises:
        error: the file cannot be read or decoded, is not valid JSON, or holds something other than an object;
            one line naming the file.
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        expected = f"; expected the {what} object" if what else ""
        raise error(f"{path}: not valid JSON ({err}){expected}") from None
    if not isinstance(value, dict):
        of = f" of {what}" if what else ""
        raise error(f"{path}: expected a JSON object{of}, found {type(value).__name__}")
    return value


__all__ = ["read_json_object"]
