"""Exclusion lists: which photos of a mined collection show what a test set shows.

Training tuples must not contain the landmarks of the test set (Radenovic et al. drop every 3-D
model holding a test image). Every test photo queries the collection's index (the same features,
vocabulary and spatial verification as mining); the collection photos verified against any test
photo form the list that ``bowr sfm export-tuples --exclude`` reads.
"""
from __future__ import annotations

import hashlib
import os

from tqdm.auto import tqdm

from bowretrieval.config import from_dict
from bowretrieval.errors import DataError
from bowretrieval.extract import extract_to_store, jobs_from_paths
from bowretrieval.featurestore import FeatureStore
from bowretrieval.imageio import list_images
from bowretrieval.vocabulary import Vocabulary

from .config import MineConfig
from .mine import Miner, load_summary
from .verify import make_verifier


def matching_images(workdir, test_photos, out_path=None, top_k: int = 50, log=print, progress: bool = True) -> list:
    """Sorted names of collection photos verified against at least one photo of ``test_photos``;
    written one per line to ``out_path`` when given."""
    s = load_summary(workdir)
    cfg = from_dict(MineConfig, s["config"], os.path.join(os.fspath(workdir), "summary.json"))
    miner = Miner(s["photos"], workdir, cfg, log=lambda *_: None, progress=progress)
    miner.stage_features(1)
    miner.stage_index(2)
    verifier = make_verifier(cfg.verify.backend, cfg.verify.threshold, cfg.verify.min_inliers,
                             cfg.verify.max_per_word, cfg.seed, cfg.threads)
    voc_path = cfg.retrieval.vocabulary or os.path.join(os.fspath(workdir), "retrieval", "vocab.npz")
    voc = Vocabulary.load(voc_path)
    paths = list_images(test_photos)
    if not paths:
        raise DataError(f"{test_photos}: no test images found")
    test_root = test_photos if os.path.isdir(test_photos) else None
    tag = hashlib.sha1(os.path.abspath(os.fspath(test_photos)).encode()).hexdigest()[:10]
    store_path = os.path.join(os.fspath(workdir), "test_features", f"{tag}.h5")
    with FeatureStore(miner.store_path) as st:
        params = st.extractor_params
    rep = extract_to_store(jobs_from_paths(paths, test_root), store_path, cfg.features.extractor, params,
                           cfg.features.max_side or None, workers=max(1, cfg.threads), progress=progress)
    hits = set()
    with FeatureStore(store_path) as st:
        for name in tqdm(st.names(), desc="match test photos", disable=not progress, unit="img"):
            d = st.descriptors(name, "rootsift")
            if len(d) == 0:
                continue
            frames = st.frames(name)
            words = voc.assign(d, 1)[:, 0]
            ranked, _ = miner.index.search([words], top=top_k)
            cands = [int(c) for c in ranked[0]]
            counts = verifier.inliers_many(frames, words, [miner.frames[c] for c in cands],
                                           [miner.words[c] for c in cands], [miner.sizes[c] for c in cands])
            hits |= {miner.names[c] for c, n in zip(cands, counts) if n >= verifier.min_inliers}
    out = sorted(hits)
    if out_path:
        with open(out_path, "w") as fh:
            fh.write(f"# collection photos matching {os.path.abspath(os.fspath(test_photos))}\n")
            fh.writelines(n + "\n" for n in out)
    log(f"{len(out)} of {len(miner.names)} collection photos match {len(paths)} test photos "
        f"({len(rep.failed)} unreadable){' -> ' + os.fspath(out_path) if out_path else ''}")
    return out
