"""The console scripts ``ptuning-chat`` and ``ptuning-serve``: Ctrl-C while their libraries load (seconds) is
one line and exit status 130, as with ``python -m ptuning.chat`` / ``python -m ptuning.serve``."""

from __future__ import annotations

import importlib
import sys


def run(module: str) -> int:
    """Imports ``module`` and returns its ``main()``'s exit status; 130 after one line when Ctrl-C stops the
    import."""
    try:
        main = importlib.import_module(module).main
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return main()


def chat() -> int:
    """``ptuning-chat``: see :mod:`ptuning.chat`."""
    return run("ptuning.chat")


def serve() -> int:
    """``ptuning-serve``: see :mod:`ptuning.serve.cli`."""
    return run("ptuning.serve.cli")
