"""Min-hash seeds (Chum, Philbin & Zisserman, "Near duplicate image detection: min-Hash and tf-idf
weighting", BMVC 2008; Chum & Matas, "Large-scale discovery of spatially related images", 2010).

Each image is the set of its visual words. A min-hash under a random hash function h is
min_{w in set} h(w); two sets agree on it with probability equal to their Jaccard similarity. A
sketch concatenates ``size`` min-hashes, so two images share a sketch with probability sim^size,
and with ``sketches`` independent sketches at least once with 1 - (1 - sim^size)^sketches.
Colliding pairs are candidates only: the caller verifies them spatially.
"""
from __future__ import annotations

import numpy as np

from bowretrieval.errors import ConfigError

_PRIME = (1 << 31) - 1


def minhash_signatures(word_sets, n_hashes: int, seed: int = 0) -> np.ndarray:
    """(n_images, n_hashes) int64 min-hashes; images without words get -1 (never collide)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _PRIME, n_hashes, dtype=np.int64)
    b = rng.integers(0, _PRIME, n_hashes, dtype=np.int64)
    out = np.full((len(word_sets), n_hashes), -1, np.int64)
    for i, w in enumerate(word_sets):
        u = np.unique(np.asarray(w, np.int64))
        if len(u) == 0:
            continue
        # universal hashing (a w + b) mod p; products stay below 2^62
        out[i] = ((a[:, None] * u[None, :] + b[:, None]) % _PRIME).min(axis=1)
    return out


def minhash_pairs(word_sets, sketches: int = 64, size: int = 3, max_bucket: int = 10, seed: int = 0) -> list:
    """Sorted unique image pairs (i < j) that share at least one sketch.

    Buckets holding more than ``max_bucket`` images are ignored: they come from very common words
    and would add many pairs that fail verification.
    """
    if sketches < 1 or size < 1:
        raise ConfigError(f"min-hash needs sketches >= 1 and size >= 1, got {sketches} and {size}")
    sig = minhash_signatures(word_sets, sketches * size, seed)
    pairs = set()
    for k in range(sketches):
        block = sig[:, k * size:(k + 1) * size]
        valid = np.nonzero(block[:, 0] >= 0)[0]
        if len(valid) < 2:
            continue
        keys, inverse = np.unique(block[valid], axis=0, return_inverse=True)
        inverse = inverse.ravel()
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=len(keys))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for key in np.nonzero((counts >= 2) & (counts <= max_bucket))[0]:
            members = valid[order[starts[key]:starts[key] + counts[key]]]
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    pairs.add((int(min(members[x], members[y])), int(max(members[x], members[y]))))
    return sorted(pairs)
