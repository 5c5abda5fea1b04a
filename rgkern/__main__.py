"""``python -m rgkern ...`` (and the ``rgkern`` console script): see :mod:`rgkern.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
