"""``python -m ptuning.serve``: see :mod:`ptuning.serve.cli`."""

import sys

from .cli import main

sys.exit(main())
