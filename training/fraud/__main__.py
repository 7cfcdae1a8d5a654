"""`python -m training.fraud`: see training.fraud.cli."""

from training.fraud.cli import main

raise SystemExit(main())
