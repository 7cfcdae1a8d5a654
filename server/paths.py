"""Where a model lives in the repository: one folder inside it, named by the model, never a path
that leads outside (the load API takes model names from clients)."""

from __future__ import annotations

import os
from pathlib import Path

from server.errors import invalid

MAX_NAME_BYTES = 255  # a file name's limit on Linux file systems (NAME_MAX)


def model_folder(root: Path, name: str) -> Path:
    """The folder of model `name` in repository `root`. A name that is a path (`..`, `/`,
    absolute), that no file system could hold, or a folder whose symlinks lead out of `root`
    is refused (400)."""
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise invalid(f"invalid model name {name!r}: a model name is a folder name, not a path")
    try:
        size = len(os.fsencode(name))
    except UnicodeEncodeError:
        raise invalid("invalid model name: not a valid file name, and a model name is a folder "
                      "name, not a path") from None  # fmt: skip
    if size > MAX_NAME_BYTES:
        raise invalid(f"invalid model name ({size} bytes): a model name is a folder name of at "
                      f"most {MAX_NAME_BYTES} bytes, not a path")  # fmt: skip
    folder = root / name
    try:
        leads_out = folder.exists() and not folder.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError) as exc:  # unreadable, a symlink loop
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise invalid(
            f"model folder '{name}' in the model repository cannot be read: {reason}"
        ) from None
    if leads_out:
        raise invalid(f"model folder '{name}' leads outside the model repository")
    return folder
