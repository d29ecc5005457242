"""``bowr eval --verify`` on a small generated dataset: verification runs inside the pipeline and
does not lower Medium mAP."""
import json

from bowretrieval import synthetic
from bowretrieval.cli import main


def test_eval_with_verification_keeps_or_raises_medium(tmp_path, capsys):
    data = synthetic.generate(tmp_path / "gen", seed=1, n_landmarks=3, views_per_landmark=5, queries_per_landmark=1,
                              n_distractors=10, n_train=12, size=(320, 240))
    common = [str(data.root), "--train", str(data.train_dir), "--quiet", "--set", "extract.extractor=sift",
              "--set", "extract.workers=1", "--set", "vocab.size=256", "--set", "vocab.iterations=5"]
    assert main(["eval"] + common + ["--work", str(tmp_path / "w1")]) == 0
    plain = json.loads(next((tmp_path / "w1").glob("results-*.json")).read_text())
    assert main(["eval"] + common + ["--work", str(tmp_path / "w2"), "--verify", "--qe", "avg"]) == 0
    verified = json.loads(next((tmp_path / "w2").glob("results-*.json")).read_text())
    assert verified["method"].endswith("+sp+qe-avg") and "verify_s" in verified["timings"]
    assert verified["medium"]["mAP"] >= plain["medium"]["mAP"] - 1e-6
