"""``python -m selfmoe ...``: the ``selfmoe`` command line (see :mod:`selfmoe.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
