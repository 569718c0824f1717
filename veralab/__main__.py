"""`python -m veralab ...` (and `torchrun ... -m veralab ...`) runs the `veralab` command."""

import sys

from veralab.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
