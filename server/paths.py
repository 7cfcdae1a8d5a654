"""Where a model lives in the repository: one folder inside it, named by the model, never a path
that leads outside (the load API takes model names from clients)."""

from __future__ import annotations

from pathlib import Path

from server.errors import invalid


def model_folder(root: Path, name: str) -> Path:
    """The folder of model `name` in repository `root`. A name that is a path (`..`, `/`,
    absolute) or a folder whose symlinks lead out of `root` is refused (400)."""
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise invalid(f"invalid model name {name!r}: a model name is a folder name, not a path")
    folder = root / name
    if folder.exists() and not folder.resolve().is_relative_to(root.resolve()):
        raise invalid(f"model folder '{name}' leads outside the model repository")
    return folder
