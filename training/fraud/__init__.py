"""Fraud scoring: transaction simulator, point-in-time features, MLP training and ONNX export.

Entry point: `main(argv)` (`python -m training.fraud`, `volley train fraud`; see cli.py).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run `python -m training.fraud` with `argv`; imports torch only when called."""
    from training.fraud.cli import main as run

    return run(argv)
