"""`python -m server` is `volley`."""

import sys

from server.cli import main

sys.exit(main())
