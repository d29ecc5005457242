"""Bag-of-words tf-idf index (Sivic & Zisserman, "Video Google", 2003): the 'bow' kind of
``bowretrieval.invfile.InvertedFile`` behind the small API the baseline pipeline uses.

idf(w) = log(N / df(w)); an image vector is v_d[w] = tf(d, w) idf(w) / ||tf idf||_2, a query the
same, and the score is their dot product. Images without features get score 0 and rank last
(ties keep database order).
"""
from __future__ import annotations

import numpy as np

from .errors import IndexFormatError
from .invfile import InvertedFile


class BowIndex(InvertedFile):
    """tf-idf inverted file. Build with ``BowIndex(n_words).fit(list_of_word_arrays)``.

    n_words: vocabulary size. threads: scoring threads for batch queries.
    """

    def __init__(self, n_words: int, threads: int = 1, **_ignored):
        super().__init__(n_words, kind="bow", threads=threads)

    def fit(self, image_words) -> "BowIndex":
        """image_words: sequence with one int array of word ids per database image (any shape)."""
        self._reset()
        words = [np.asarray(w).reshape(-1) for w in image_words]
        img = np.repeat(np.arange(len(words), dtype=np.int64), [len(w) for w in words])
        allw = np.concatenate(words) if words else np.zeros(0, np.int32)
        return self.add(allw, img, n_images=len(words)).compact()

    def search(self, queries, top: int | None = None):
        """Ranked database ids (n_queries, top or all) and their scores, best first.
        ``queries``: one array of word ids per query."""
        return super().search([(q, None) for q in queries], top)

    def scores(self, queries) -> np.ndarray:
        """Dense cosine scores (n_queries, n_images)."""
        ids, s = self.search(queries, None)
        out = np.zeros((len(queries), self.n_images_), np.float32)
        np.put_along_axis(out, ids, s, axis=1)
        return out

    @classmethod
    def load(cls, path, threads: int = 1, mmap: bool = True, verify: bool = False) -> "BowIndex":
        ivf = InvertedFile.load(path, threads=threads, mmap=mmap, verify=verify)
        if ivf.kind != "bow":
            raise IndexFormatError(f"{path}: a {ivf.kind!r} index, not a BoW index")
        self = cls(ivf.n_words, threads)
        self.__dict__.update(ivf.__dict__)
        return self
