"""method=eval as real jobs: a 2-process run predicts exactly what a 1-process run does."""
import csv
import json

import pytest

from hpcllm.config import compose
from hpcllm.launch.job import prepare
from hpcllm.launch.local import run_local

pytestmark = pytest.mark.e2e


def run_eval_job(run_dir, ranks, *overrides):
    job = prepare(compose(["method=eval", f"hw.gpus_per_node={ranks}", "data.train=null", *overrides]), run_dir)
    assert run_local(job.run_dir, ranks, "cpu") == 0, (run_dir / "logs" / "rank1.log").read_text() if ranks > 1 else ""
    with open(run_dir / "predictions.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f)), json.loads((run_dir / "results.json").read_text())


@pytest.mark.timeout(180)
def test_two_ranks_predict_exactly_what_one_rank_does(tmp_path):
    # batch_size 5 over 24 questions: the last batch is partial and the ranks get unequal shares.
    args = ("eval.benchmark=ceval", "eval.shots=5", "eval.batch_size=5")
    one, results_one = run_eval_job(tmp_path / "one rank", 1, *args)
    two, results_two = run_eval_job(tmp_path / "two ranks", 2, *args)
    assert len(one) == 24 and one == two
    for key in ("subjects", "categories", "hard", "overall", "prompts"):
        assert results_one[key] == results_two[key]
    assert results_two["world_size"] == 2 and (tmp_path / "two ranks" / "results.md").is_file()


@pytest.mark.timeout(180)
def test_perplexity_weights_every_learned_token_once(tmp_path):
    import numpy as np

    from hpcllm.data import MemmapDataset
    from hpcllm.launch.datasets import ensure_memmaps

    job = prepare(compose(["method=eval", "eval.benchmark=perplexity", "hw.gpus_per_node=2", "eval.batch_size=16"]),
                  tmp_path)
    paths = ensure_memmaps(job.cfg, job.run_dir)
    assert run_local(job.run_dir, 2, "cpu") == 0
    result = json.loads((tmp_path / "results.json").read_text())
    labels = MemmapDataset(paths["train"]).arrays["labels"]
    assert result["tokens"] == int((np.asarray(labels)[:, 1:] != -100).sum())
    assert result["perplexity"] == pytest.approx(np.exp(result["mean_nll"]))
    assert 0 < result["mean_nll"] < 20
