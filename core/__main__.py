"""`python -m core`: the Perplexity Lens command line."""

import sys

from core.cli import main

if __name__ == "__main__":
    sys.exit(main())
