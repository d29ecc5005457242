"""CNN fine-tuning: networks, GeM, losses, tuples, training, whitening, bad input (CPU, tiny nets)."""
import argparse
import json
import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bowretrieval import cli_finetune  # noqa: E402
from bowretrieval.errors import ConfigError, DataError  # noqa: E402
from bowretrieval.finetune import (  # noqa: E402
    FinetuneConfig, GeM, LearnedWhitening, NetworkSpec, PCAWhitening, Trainer, TrainingDiverged, alpha_qe,
    build_network, load_backbone_weights, load_network, load_tuples, select_device)
from bowretrieval.finetune.losses import contrastive_loss, triplet_loss  # noqa: E402
from bowretrieval.finetune.retrieval import dataset_vectors, evaluate_vectors, extract_vectors  # noqa: E402
from bowretrieval.finetune.toydata import write_toy_tuples  # noqa: E402
from bowretrieval.finetune.train import describe, mine_negatives  # noqa: E402
from bowretrieval.finetune.networks import gem_combine  # noqa: E402
from bowretrieval.revisited import RevisitedDataset  # noqa: E402

torch.set_num_threads(1)  # the 2 shared cores: more threads are slower here


def tiny_cfg(epochs=1, queries=8, lr=1e-3):
    cfg = FinetuneConfig()
    cfg.network.arch, cfg.network.width = "resnet_tiny", 8
    t = cfg.train
    t.epochs, t.queries_per_epoch, t.lr, t.lr_p, t.accumulate, t.image_size = epochs, queries, lr, 1e-2, 2, 64
    t.negatives, t.device, t.threads = 3, "cpu", 1
    return cfg


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """40 training landmarks, 6 held-out ones (revisited ground truth), 64x48 images."""
    d = tmp_path_factory.mktemp("toy")
    return write_toy_tuples(str(d), n_train=40, n_val=2, n_test=6, views=4, size=(64, 48), seed=0)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    return write_toy_tuples(str(d), n_train=6, n_val=0, n_test=2, views=3, n_distractors=2, size=(48, 36), seed=1)


# -- training works --------------------------------------------------------------------------------
def _fixed_tuple_loss(net, tuples, fixed):
    dev = torch.device("cpu")
    from bowretrieval.finetune.tuples import read_rgb

    total = 0.0
    for q, p, negs in fixed:
        d = describe(net, [read_rgb(tuples.paths[i], 64) for i in [q, p] + negs], dev)
        total += float(contrastive_loss(d, 0.7))
    return total / len(fixed)


def _heldout_map(net, toy):
    ds = RevisitedDataset(toy["root"], "gnd_toy.json")
    X, Q, _ = dataset_vectors(net, ds, torch.device("cpu"), 64, progress=False)
    return evaluate_vectors(X, Q, ds.gnd)["medium"]["mAP"]


def test_training_lowers_the_loss_and_raises_heldout_map(toy, tmp_path):
    tuples = load_tuples(toy["tuples"])
    tr = Trainer(tiny_cfg(epochs=3, queries=40), tuples, tmp_path, resume=False, progress=False, log=lambda s: None)
    s = tuples.split("train")
    # the tuples the initial network mines, scored before and after training
    from bowretrieval.finetune.tuples import read_rgb

    imgs = lambda idx: [read_rgb(tuples.paths[i], 64) for i in idx]  # noqa: E731
    qd, pd = describe(tr.net, imgs(s.qidxs), tr.device), describe(tr.net, imgs(s.negative_pool), tr.device)
    negs = mine_negatives(qd, pd, s.negative_pool, tuples.cluster, s.qidxs, 3)
    fixed = [(int(q), int(p), n) for q, p, n in zip(s.qidxs, s.pidxs, negs)]
    loss0, map0 = _fixed_tuple_loss(tr.net, tuples, fixed), _heldout_map(tr.net, toy)
    tr.fit()
    loss1, map1 = _fixed_tuple_loss(tr.net, tuples, fixed), _heldout_map(tr.net, toy)
    assert loss1 < 0.8 * loss0
    assert map1 > map0 + 5.0, (map0, map1)


def test_mined_negatives_are_hardest_with_one_per_model():
    q = torch.tensor([[1.0, 0.0]])
    pool = torch.tensor([[0.99, 0.14], [0.98, 0.2], [0.9, 0.43], [0.0, 1.0], [0.95, 0.31]])
    pool_idx = np.array([10, 11, 12, 13, 14])
    cluster = np.full(15, -1)
    cluster[[0, 10]] = 0          # 10 is in the query's model
    cluster[[11, 14]] = 1         # 11 and 14 share a model: only the harder (11) may be used
    cluster[[12]], cluster[[13]] = 2, 3
    assert mine_negatives(q, pool, pool_idx, cluster, [0], 3) == [[11, 12, 13]]


# -- GeM, losses -----------------------------------------------------------------------------------
def test_gem_p_gradient_matches_finite_differences():
    torch.manual_seed(0)
    x = torch.rand(2, 5, 4, 3, dtype=torch.float64) + 0.05
    gem = GeM(3.0).double()
    gem(x).sum().backward()
    h = 1e-6
    with torch.no_grad():
        gem.p += h
        up = gem(x).sum().item()
        gem.p -= 2 * h
        down = gem(x).sum().item()
    assert gem.p.grad.item() == pytest.approx((up - down) / (2 * h), rel=1e-6)


def test_gem_with_p_1_is_average_pooling():
    x = torch.rand(1, 3, 5, 5) + 0.1
    assert torch.allclose(GeM(1.0)(x), x.mean(dim=(2, 3)), atol=1e-6)


def test_contrastive_loss_on_a_hand_computed_tuple():
    d = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.96, 0.28]])
    # ||q-p||^2 = 0.4; ||q-n1|| = sqrt(2) > tau adds nothing; ||q-n2||^2 = 0.08
    tau = 0.7
    assert float(contrastive_loss(d, tau)) == pytest.approx(0.5 * 0.4 + 0.5 * (tau - 0.08 ** 0.5) ** 2, abs=1e-5)
    # triplet: max(0, 0.1 + 0.4 - 2) + max(0, 0.1 + 0.4 - 0.08)
    assert float(triplet_loss(d, 0.1)) == pytest.approx(0.42, abs=1e-5)


# -- whitening, QE ---------------------------------------------------------------------------------
def test_learned_whitening_equals_its_closed_form():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 4))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    q, p = np.arange(0, 20), np.arange(20, 40)
    lw = LearnedWhitening().fit(X, q, p)
    # closed form (algorithms.md): m, Cs, W = chol(Cs)^-1, eig of W (X-m)(X-m)^T W^T, P = V^T W
    m = X[q].mean(0)
    df = X[q] - X[p]
    W = np.linalg.inv(np.linalg.cholesky(df.T @ df / len(q)))
    evals, V = np.linalg.eig(W @ (X - m).T @ (X - m) @ W.T)
    P = V[:, np.argsort(-evals)].T @ W
    Y = (X - m) @ P.T
    Y /= np.linalg.norm(Y, axis=1, keepdims=True)
    ours = lw.transform(X)
    signs = np.sign((ours * Y).sum(0))  # eigenvectors are defined up to sign
    assert np.allclose(ours, Y * signs, atol=1e-5)


def test_pca_whitening_uses_the_package_estimator_with_all_supported_components():
    from bowretrieval.finetune.retrieval import learn_whitening

    rng = np.random.default_rng(1)
    X = rng.normal(size=(20, 30))
    pw = learn_whitening("pcaw", X, None, None)
    assert isinstance(pw, PCAWhitening) and pw.components_.shape == (19, 30)
    assert np.allclose(np.cov(pw.project(X).T), np.eye(19), atol=1e-4)


def test_whitening_files_round_trip(tmp_path):
    from bowretrieval.finetune.whiten import load_whitening, save_whitening

    rng = np.random.default_rng(2)
    X = rng.normal(size=(50, 8))
    for est in (LearnedWhitening(4).fit(X, np.arange(25), np.arange(25, 50)), PCAWhitening(5).fit(X)):
        save_whitening(tmp_path / "w.npz", est)
        assert np.allclose(load_whitening(tmp_path / "w.npz").transform(X), est.transform(X), atol=1e-6)


def test_alpha_qe_adds_weighted_top_k():
    X = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)
    Q = np.array([[0.8, 0.6]], np.float32)
    out = alpha_qe(Q, X, k=2, alpha=3.0)
    # top-2 by similarity: X1 (0.96), X0 (0.8)
    exp = Q[0] + 0.96 ** 3 * X[1] + 0.8 ** 3 * X[0]
    assert np.allclose(out[0], exp / np.linalg.norm(exp), atol=1e-6)


# -- extraction ------------------------------------------------------------------------------------
def test_multiscale_descriptor_is_the_gem_of_single_scale_ones(small):
    tuples = load_tuples(small["tuples"])
    net = build_network(NetworkSpec("resnet_tiny", 8)).eval()
    dev = torch.device("cpu")
    path = tuples.paths[0]
    ms = extract_vectors(net, [path], dev, 48, (1.0, 0.5), progress=False)[0]
    from bowretrieval.finetune.tuples import read_rgb
    import cv2

    img = read_rgb(path, 48)
    half = cv2.resize(img, (round(img.shape[1] * 0.5), round(img.shape[0] * 0.5)), interpolation=cv2.INTER_AREA)
    vs = [describe(net, [im], dev)[0] for im in (img, half)]
    exp = gem_combine(vs, float(net.pool.p.detach())).numpy()
    assert np.allclose(ms, exp, atol=1e-5)
    assert np.linalg.norm(ms) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("arch,n_params", [("resnet18", 11_176_512), ("resnet50", 23_508_032),
                                           ("mobilenet_v2", 2_223_872), ("vgg16", 14_714_688)])
def test_backbones_have_torchvision_parameter_counts(arch, n_params):
    # torchvision's totals minus the classifier (fc / classifier layers)
    from bowretrieval.finetune.networks import count_parameters

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        net = build_network(NetworkSpec(arch))
    assert count_parameters(net.features) == n_params


# -- weights files ---------------------------------------------------------------------------------
def test_torchvision_and_wrapped_key_names_load(tmp_path):
    src = build_network(NetworkSpec("resnet_tiny", 8))
    sd = {"module." + k: v for k, v in src.features.state_dict().items()}
    sd["module.fc.weight"] = torch.zeros(10, 64)  # a classifier head is ignored
    torch.save({"state_dict": sd}, tmp_path / "w.pth")
    dst = build_network(NetworkSpec("resnet_tiny", 8))
    load_backbone_weights(dst, tmp_path / "w.pth")
    assert all(torch.equal(a, b) for a, b in zip(src.features.state_dict().values(), dst.features.state_dict().values()))


def test_cirtorch_positional_resnet_names_load(tmp_path):
    src = build_network(NetworkSpec("resnet_tiny", 8))
    names = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    sd = {}
    for k, v in src.features.state_dict().items():
        head, _, rest = k.partition(".")
        sd[f"features.{names[head]}.{rest}"] = v
    sd["pool.p"] = torch.ones(1) * 3
    torch.save({"state_dict": sd, "meta": {}}, tmp_path / "cirtorch.pth")
    dst = build_network(NetworkSpec("resnet_tiny", 8))
    load_backbone_weights(dst, tmp_path / "cirtorch.pth")
    assert torch.equal(dst.features.conv1.weight, src.features.conv1.weight)


def test_weights_of_another_architecture_name_the_mismatching_layers(tmp_path):
    torch.save(build_network(NetworkSpec("resnet_tiny", 8)).features.state_dict(), tmp_path / "r.pth")
    with pytest.raises(DataError, match=r"shape mismatch: conv1\.weight file \(8, 3, 7, 7\) vs network \(16, 3, 7, 7\)"):
        load_backbone_weights(build_network(NetworkSpec("resnet_tiny", 16)), tmp_path / "r.pth")
    with pytest.raises(DataError, match=r"missing in file: 0\.weight.*not in network: conv1\.weight"):
        load_backbone_weights(build_network(NetworkSpec("vgg_small", 8)), tmp_path / "r.pth")


# -- tuple files and bad input ---------------------------------------------------------------------
def test_tuple_file_with_missing_images_is_refused(small, tmp_path):
    d = json.load(open(small["tuples"]))
    d["image_root"] = os.path.join(small["root"], "jpg")
    d["images"][3] = "gone.jpg"
    (tmp_path / "tuples.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match=r"1 of \d+ referenced images are missing, e\.g\. .*gone\.jpg"):
        load_tuples(tmp_path)


def test_empty_negative_pool_is_refused(small, tmp_path):
    d = json.load(open(small["tuples"]))
    d["image_root"] = os.path.join(small["root"], "jpg")
    d["train"]["negative_pool"] = []
    (tmp_path / "tuples.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match="negative pool is empty"):
        Trainer(tiny_cfg(), load_tuples(tmp_path), tmp_path / "run", progress=False, log=lambda s: None)


def test_trainer_pkl_layout_reads_like_the_json_export(small, tmp_path):
    js = load_tuples(small["tuples"])
    s = js.split("train")
    used = sorted(set(s.qidxs) | set(s.pidxs) | set(s.negative_pool))
    pos = {int(i): k for k, i in enumerate(used)}
    cids = [os.path.splitext(os.path.relpath(js.paths[i], os.path.join(small["root"], "jpg")))[0] for i in used]
    pkl = {"train": {"cids": cids, "cluster": [int(js.cluster[i]) for i in used],
                     "qidxs": [pos[int(q)] for q in s.qidxs], "pidxs": [pos[int(p)] for p in s.pidxs]}}
    with open(tmp_path / "trainer.pkl", "wb") as fh:
        pickle.dump(pkl, fh)
    with pytest.raises(DataError, match="--image-root"):
        load_tuples(tmp_path / "trainer.pkl")
    ts = load_tuples(tmp_path / "trainer.pkl", image_root=os.path.join(small["root"], "jpg"))
    t = ts.split("train")
    assert [ts.paths[i] for i in t.qidxs] == [js.paths[i] for i in s.qidxs]
    assert [ts.paths[i] for i in t.pidxs] == [js.paths[i] for i in s.pidxs]
    assert list(ts.cluster[t.qidxs]) == list(js.cluster[s.qidxs])


def test_mixed_precision_path_trains_on_cpu(small, tmp_path):
    cfg = tiny_cfg(epochs=1)
    cfg.train.amp = "on"  # bfloat16 autocast on CPU, float16 + loss scaling on CUDA: the same code
    tr = Trainer(cfg, load_tuples(small["tuples"]), tmp_path, progress=False, log=lambda s: None)
    hist = tr.fit()
    assert np.isfinite(hist[0]["loss"]) and hist[0]["loss"] > 0
    assert (tmp_path / "checkpoint.pt").exists()


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        select_device("cuda")
    assert select_device("auto").type == "cpu"


# -- checkpoints -----------------------------------------------------------------------------------
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(small, tmp_path):
    tuples = load_tuples(small["tuples"])
    Trainer(tiny_cfg(epochs=1), tuples, tmp_path, progress=False, log=lambda s: None).fit()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    tr = Trainer(tiny_cfg(epochs=2), tuples, tmp_path, progress=False, log=lambda s: None)
    with torch.no_grad():
        tr.net.pool.p.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="loss is nan.*last good checkpoint .*checkpoint.pt \\(epoch 1\\) is unchanged"):
        tr.fit()
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resumed_training_matches_uninterrupted_training(small, tmp_path):
    tuples = load_tuples(small["tuples"])
    quiet = dict(progress=False, log=lambda s: None)
    Trainer(tiny_cfg(epochs=2), tuples, tmp_path / "straight", **quiet).fit()
    Trainer(tiny_cfg(epochs=1), tuples, tmp_path / "resumed", **quiet).fit()
    tr = Trainer(tiny_cfg(epochs=2), tuples, tmp_path / "resumed", **quiet)
    assert tr.epoch == 1
    tr.fit()
    a, b = load_network(tmp_path / "straight" / "checkpoint.pt"), load_network(tmp_path / "resumed" / "checkpoint.pt")
    assert tr.epoch == 2 and len(tr.history) == 2
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k


def test_checkpoint_rebuilds_the_network_from_its_description(small, tmp_path):
    cfg = tiny_cfg(epochs=1)
    cfg.network.arch, cfg.network.whitening = "vgg_small", 16
    tr = Trainer(cfg, load_tuples(small["tuples"]), tmp_path, progress=False, log=lambda s: None)
    tr.fit()
    net = load_network(tmp_path / "checkpoint.pt")
    assert net.spec.arch == "vgg_small" and net.dim == 16
    x = torch.rand(1, 3, 40, 40) * 255
    tr.net.eval()
    assert torch.allclose(net(x), tr.net(x), atol=1e-6)


# -- command line ----------------------------------------------------------------------------------
def test_cli_trains_and_evaluates_with_whitening_and_qe(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli_finetune.register(parser.add_subparsers())

    def run(*argv):
        args = parser.parse_args(["finetune", *argv])
        return args.func(args)

    data, work = str(tmp_path / "toy"), str(tmp_path / "run")
    assert run("toydata", data, "--train", "6", "--val", "0", "--test", "2", "--views", "3", "--size", "48x36") == 0
    assert run("train", "--tuples", data, "--workdir", work, "--arch", "resnet_tiny", "--epochs", "1", "--threads", "1",
               "--set", "network.width=8", "--set", "train.image_size=48", "--set", "train.queries_per_epoch=4") == 0
    out = str(tmp_path / "res.json")
    assert run("eval", "--checkpoint", os.path.join(work, "checkpoint.pt"), "--dataset", data, "--gnd", "gnd_toy.json",
               "--tuples", data, "--whitening", "none,lw,pcaw", "--qe-k", "1", "--image-size", "48",
               "--out", out, "--threads", "1", "--save-whitening", work) == 0
    res = json.load(open(out))["results"]
    assert set(res) == {"net", "net +aQE1", "net+Lw", "net+Lw +aQE1", "net+PCAw", "net+PCAw +aQE1"}
    assert all(0 <= r["medium"]["mAP"] <= 100 for r in res.values())
    assert "net+Lw +aQE1" in capsys.readouterr().out
    vecs = str(tmp_path / "v.npz")
    assert run("extract", "--checkpoint", os.path.join(work, "checkpoint.pt"), "--images", os.path.join(data, "jpg"),
               "--out", vecs, "--whitening", os.path.join(work, "whiten-lw.npz"), "--image-size", "48") == 0
    z = np.load(vecs)
    assert z["descriptors"].shape == (len(os.listdir(os.path.join(data, "jpg"))), 64)
    assert np.allclose(np.linalg.norm(z["descriptors"], axis=1), 1.0, atol=1e-5)


def test_synthetic_scenes_give_geometric_tuples(tmp_path):
    from bowretrieval.finetune.toydata import write_synthetic_tuples

    info = write_synthetic_tuples(str(tmp_path), n_train=3, n_val=0, n_test=1, views=3, n_distractors=1,
                                  size=(64, 64), seed=0)
    ts = load_tuples(info["tuples"])
    s = ts.split("train")
    assert len(s.qidxs) > 0
    for q, p, ps in zip(s.qidxs, s.pidxs, s.positives):
        assert p in ps and q not in ps
        assert all(ts.cluster[i] == ts.cluster[q] for i in ps)
    assert set(ts.cluster[s.negative_pool]) == {0, 1, 2}
    assert len(RevisitedDataset(info["root"], "gnd_toy.json").qimlist) == 3
