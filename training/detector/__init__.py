"""Object detector: synthetic data, training, ONNX export. Entry point: `main` (see cli.py)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run `python -m training.detector` with `argv`; imports torch only when called."""
    from training.detector.cli import main as run

    return run(argv)
