"""CNN fine-tuning for retrieval (optional extra ``[finetune]``; the only sub-package that imports torch).

GeM networks trained on tuples mined from 3D models (Radenovic, Tolias & Chum, TPAMI 2018), learned
whitening, multi-scale extraction, alpha-QE and revisited-protocol evaluation. See docs/finetune.md.
"""
from .config import FinetuneConfig
from .networks import ARCHS, GeM, NetworkSpec, RetrievalNet, build_network, load_backbone_weights
from .retrieval import MULTISCALE, evaluate_vectors, extract_vectors, learn_whitening
from .train import Trainer, TrainingDiverged, load_network, select_device, train
from .tuples import TupleSet, load_tuples
from .whiten import LearnedWhitening, PCAWhitening, alpha_qe

__all__ = ["FinetuneConfig", "ARCHS", "GeM", "NetworkSpec", "RetrievalNet", "build_network",
           "load_backbone_weights", "MULTISCALE", "evaluate_vectors", "extract_vectors", "learn_whitening",
           "Trainer", "TrainingDiverged", "load_network", "select_device", "train", "TupleSet", "load_tuples",
           "LearnedWhitening", "PCAWhitening", "alpha_qe"]
