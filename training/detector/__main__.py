"""`python -m training.detector`."""

import sys

from training.detector.cli import main

if __name__ == "__main__":  # importable without side effects, as spawned workers need
    sys.exit(main())
