"""``python -m ptuning.serve``: see :mod:`ptuning.serve.cli`."""

import sys

from ..console import exit_on_interrupt

with exit_on_interrupt(__name__):  # Ctrl-C while the libraries load (seconds): one line, as everywhere else
    from .cli import main

sys.exit(main())
