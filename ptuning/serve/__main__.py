"""``python -m ptuning.serve``: see :mod:`ptuning.serve.cli`."""

import sys

try:  # Ctrl-C while the libraries load (seconds): one line, as everywhere else
    from .cli import main
except KeyboardInterrupt:
    print("\ninterrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
