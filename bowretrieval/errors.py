"""One exception hierarchy for the package: catch ``BowRetrievalError`` to catch them all."""


class BowRetrievalError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(BowRetrievalError, ValueError):
    """A configuration file or value is malformed (names the file and the field)."""


class ImageError(BowRetrievalError):
    """An image cannot be read or used (names the file and the reason)."""


class DataError(BowRetrievalError, ValueError):
    """Input arrays or dataset files are malformed (ground truth, descriptors, tuples...)."""


class FeatureStoreError(BowRetrievalError):
    """An HDF5 feature store is missing, corrupt or written with other settings."""


class IndexFormatError(BowRetrievalError):
    """An on-disk index is truncated, corrupt, or written by another format version."""


class NotFittedError(BowRetrievalError, AttributeError):
    """An estimator (vocabulary, PCA, whitening) is used before ``fit``."""
