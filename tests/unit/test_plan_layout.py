"""layout=auto: the fastest layout predicted to fit, with the job's global batch kept."""
import copy
import os
import subprocess
import sys

import pytest

from hpcllm.config import PROJECT_ROOT, ConfigError, compose, derive
from hpcllm.plan import choose_layout, estimate, rank_layouts

JOB = ["model=llama2_7b", "method=sft", "hw=a100x8_40gb", "method.seq_len=1024", "method.micro_batch_size=4",
       "method.global_batch_size=32"]


@pytest.fixture(scope="module")
def job():
    return compose(JOB)


@pytest.fixture(scope="module")
def ranked(job):
    return rank_layouts(job)


def test_candidates_cover_every_profile_and_checkpointing(ranked):
    assert {(l.zero, l.gradient_checkpointing) for l in ranked} == {
        (z, gc) for z in ("stage0", "stage1", "stage2", "stage3", "stage2_offload", "stage3_offload")
        for gc in (False, True)}


def test_fitting_layouts_come_first_fastest_first_and_keep_the_global_batch(job, ranked):
    fitting = [l for l in ranked if l.fits]
    assert fitting and ranked[:len(fitting)] == fitting
    speeds = [l.tokens_per_sec_per_gpu for l in fitting]
    assert speeds == sorted(speeds, reverse=True)
    # Full fine-tuning of 6.7B parameters does not fit 40 GB unpartitioned (stage 0 needs 16 bytes each).
    assert not any(l.fits for l in ranked if l.zero == "stage0")
    global_batch = derive(job).global_batch_size
    for layout in fitting:
        cfg = compose(JOB + layout.overrides + [f"method.global_batch_size={global_batch}"])
        est = estimate(cfg, derive(cfg), with_remedies=False)
        assert est.fits_gpu and est.step_time_s == pytest.approx(layout.step_time_s)
        assert derive(cfg).global_batch_size == global_batch
        # A micro batch that divides the per-rank batch (the recipe's global batch over 8 ranks).
        assert (global_batch // derive(job).data_parallel_size) % layout.micro_batch_size == 0


def test_choose_layout_applies_the_fastest(job, ranked, capsys):
    auto = copy.deepcopy(job)
    auto.layout = "auto"
    chosen = choose_layout(auto)
    best = ranked[0]
    assert (chosen.zero.name, chosen.train.gradient_checkpointing, chosen.method.micro_batch_size) == \
        (best.zero, best.gradient_checkpointing, best.micro_batch_size)
    assert derive(chosen).global_batch_size == derive(job).global_batch_size
    out = capsys.readouterr().out
    assert "layout=auto: candidates, fastest fitting first" in out
    assert f"->  1. fits zero={best.zero}" in out and "OOM  zero=stage0" in out
    # The README shows this ranking for the same job.
    readme = open(os.path.join(PROJECT_ROOT, "README.md")).read().splitlines()
    shown = [line for line in readme if "tok/s/gpu  bound by" in line]
    assert len(shown) >= 3 and all(line in out.splitlines() for line in shown)


def test_manual_is_untouched_and_nothing_fitting_leaves_the_job_to_the_preflight(job):
    manual = compose(JOB + ["layout=manual"])
    assert choose_layout(manual) is manual
    hopeless = compose(["model=llama_65b", "method=sft", "hw=t4x8", "layout=auto"])
    assert choose_layout(hopeless) is hopeless
    with pytest.raises(ConfigError, match="layout='fastest' is not a layout mode: use layout=manual or layout=auto"):
        choose_layout(compose(JOB + ["layout=fastest"]))


def test_dry_run_shows_the_ranking_and_renders_the_chosen_layout(tmp_path):
    run = tmp_path / "run dir"
    out = subprocess.run([sys.executable, "launch.py", *JOB, "layout=auto", "dry_run=true", "preflight=warn",
                          f"hydra.run.dir={run}"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "layout=auto: candidates" in out.stdout
    chosen = next(line for line in out.stdout.splitlines() if line.startswith("->"))
    zero = chosen.split("zero=")[1].split()[0]
    assert f'"stage": {zero[5]}' in (run / "ds_config.json").read_text()
