"""`python -m fastssl.train`: the reference trainer (see `python -m fastssl.train --help`)."""

import sys

from fastssl.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
