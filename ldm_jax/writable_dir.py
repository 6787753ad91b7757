"""Whether a directory a job will write can be used, checked before anything is written (train.py's
``--workdir``, sample.py's ``--outdir``)."""
from __future__ import annotations

import os
from typing import Optional


def directory_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be a writable directory (an existing one, or one ``os.makedirs`` would
    create), or None. Nothing is created."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            return f"{path} is a file, not a directory"
        return None if os.access(path, os.W_OK | os.X_OK) else f"{path} is not writable"
    parent = os.path.dirname(path)
    while not os.path.exists(parent):  # the nearest existing ancestor is where makedirs starts
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"it cannot be created: {parent} is a file"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"it cannot be created: {parent} is not writable"
