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


@pytest.mark.timeout(420)  # two launches; about 230 s on 2 cores shared by other jobs
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


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """The tiny preset with seeded random weights, saved as a Hugging Face directory (model.path)."""
    from hpcllm.data import load_tokenizer
    from hpcllm.models.build import build_model

    out = tmp_path_factory.mktemp("model")
    model_cfg = compose([]).model
    tokenizer = load_tokenizer(model_cfg.tokenizer, None)
    build_model(model_cfg, tokenizer=tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.timeout(900)
def test_zero3_partitions_the_evaluated_model_and_scores_as_one_whole_copy(tmp_path, saved_model, capfd):
    """zero=stage3: two ranks each hold half of the model (an optimizer-less DeepSpeed engine) and give the
    predictions of one rank holding it whole; the rank with one batch fewer runs a filler batch."""
    args = ("eval.benchmark=ceval", "eval.shots=5", "eval.batch_size=5", f"model.path={saved_model}")
    whole, _ = run_eval_job(tmp_path / "whole", 1, *args)
    parts, results = run_eval_job(tmp_path / "zero3", 2, *args, "zero=stage3")
    assert "hpcllm: evaluated model: ZeRO-3 partitioned" in capfd.readouterr().out  # rank 0 prints here
    assert len(whole) == 24 and [r["prediction"] for r in parts] == [r["prediction"] for r in whole]
    for a, b in zip(whole, parts):
        for letter in "ABCD":
            assert float(b[f"prob_{letter}"]) == pytest.approx(float(a[f"prob_{letter}"]), abs=1e-5)
    assert results["world_size"] == 2

    perplexity = ("eval.benchmark=perplexity", "eval.batch_size=16", f"model.path={saved_model}")
    ppl = {}
    for name, ranks, extra in (("whole ppl", 1, ()), ("zero3 ppl", 2, ("zero=stage3",))):
        job = prepare(compose(["method=eval", f"hw.gpus_per_node={ranks}", *perplexity, *extra]), tmp_path / name)
        assert run_local(job.run_dir, ranks, "cpu") == 0
        ppl[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert ppl["zero3 ppl"]["tokens"] == ppl["whole ppl"]["tokens"]
    assert ppl["zero3 ppl"]["mean_nll"] == pytest.approx(ppl["whole ppl"]["mean_nll"], rel=1e-5)


@pytest.mark.timeout(600)
def test_cmrc2018_generation_on_two_ranks_gives_the_one_rank_answers(tmp_path):
    """Generation (CLUE and CMRC2018 share the multiple-choice runner): 2 ranks with unequal shares (batches of
    3 and 1) answer as one in-process rank does."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from test_eval_stage import run_in_process

    args = ("eval.benchmark=cmrc2018", "eval.shots=0", "eval.batch_size=3", "eval.max_new_tokens=4")
    results_one, _, one = run_in_process(tmp_path / "one", *args)
    two, results_two = run_eval_job(tmp_path / "two", 2, *args)
    assert len(one) == 4 and one == two
    assert results_one["metrics"] == results_two["metrics"] and results_two["world_size"] == 2
