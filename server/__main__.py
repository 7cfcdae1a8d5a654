"""`python -m server` is `volley`."""

import sys

from server.cli import main

if __name__ == "__main__":  # not when a worker process started with spawn imports this module
    sys.exit(main())
