"""`python -m training.detector`."""

import sys

from training.detector.cli import main

sys.exit(main())
