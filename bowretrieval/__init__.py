"""bowretrieval: particular-object image retrieval in the bag-of-words tradition.

zlib is imported before anything else on purpose: pycolmap 4.1/4.2 bundles its own zlib, and if it
is loaded first a later ``zlib.compress`` (``np.savez_compressed``, PNG encoding) aborts the process.
"""
import zlib  # noqa: F401  (must stay the first import; see module docstring)

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
