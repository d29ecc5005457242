"""bowretrieval: particular-object image retrieval in the bag-of-words tradition.

zlib is imported before anything else on purpose: pycolmap 4.1/4.2 bundles its own zlib, and if it
is loaded first a later ``zlib.compress`` (``np.savez_compressed``, PNG encoding) aborts the process.
"""
import zlib  # noqa: F401  (must stay the first import; see module docstring)

import sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

from .errors import (  # noqa: E402
    BowRetrievalError,
    ConfigError,
    DataError,
    FeatureStoreError,
    ImageError,
    IndexFormatError,
    NotFittedError,
)

__version__ = "0.1.0"


class _SourceTreeFinder:
    """Find ``bowretrieval.sfm`` in a source checkout, where it lives in ``sfm/`` beside the package
    (setup.py maps it there; installed copies do not need this)."""

    root = _Path(__file__).resolve().parent.parent

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "bowretrieval.sfm":
            return None
        import importlib.util

        init = cls.root / "sfm" / "__init__.py"
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


if ((_SourceTreeFinder.root / "setup.py").is_file() and (_SourceTreeFinder.root / "sfm" / "__init__.py").is_file()
        and not any(isinstance(f, type) and f.__name__ == "_SourceTreeFinder" for f in sys.meta_path)):
    sys.meta_path.append(_SourceTreeFinder)

__all__ = [
    "BowRetrievalError",
    "ConfigError",
    "DataError",
    "FeatureStoreError",
    "ImageError",
    "IndexFormatError",
    "NotFittedError",
    "__version__",
]
