"""Atomic ``.npz`` writing shared by every artefact saved as numpy arrays (vocabularies,
projections, codebooks, bundles, word caches): nothing half-written ever carries the final name."""
from __future__ import annotations

import contextlib
import json
import os

import numpy as np


def save_npz_atomic(path, **arrays) -> str:
    """Write ``arrays`` to ``path`` through ``path + '.tmp.npz'`` renamed into place; returns ``path``.
    A failed write removes the temporary file and re-raises."""
    path = os.fspath(path)
    tmp = path + ".tmp.npz"
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def json_array(obj) -> np.ndarray:
    """A JSON document as a 0-d string array, the form metadata takes inside our .npz files."""
    return np.array(json.dumps(obj))
