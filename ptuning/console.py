"""The console scripts ``ptuning-chat`` and ``ptuning-serve``, and what every command does when Ctrl-C arrives
while its libraries load (seconds): one line and exit status 130 (:func:`exit_on_interrupt`)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def exit_on_interrupt(module: str, note: str = "") -> Iterator[None]:
    """Ctrl-C inside the block (a command's imports) prints one line (``interrupted``, or ``interrupted:
    <note>``) and exits with status 130 when ``module`` (the caller's ``__name__``) runs as the command
    (``__main__``); imported by other code, the ``KeyboardInterrupt`` goes on."""
    try:
        yield
    except KeyboardInterrupt:
        if module != "__main__":
            raise
        print("\ninterrupted" + (f": {note}" if note else ""), file=sys.stderr)
        sys.exit(130)


def run(module: str) -> int:
    """Imports ``module`` and returns its ``main()``'s exit status; exits 130 after one line when Ctrl-C stops
    the import."""
    with exit_on_interrupt("__main__"):
        main = importlib.import_module(module).main
    return main()


def chat() -> int:
    """``ptuning-chat``: see :mod:`ptuning.chat`."""
    return run("ptuning.chat")


def serve() -> int:
    """``ptuning-serve``: see :mod:`ptuning.serve.cli`."""
    return run("ptuning.serve.cli")
