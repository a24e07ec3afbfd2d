"""Pipeline parallelism for real: `python launch.py` with 2 CPU ranks as 2 pipeline stages (DeepSpeed
PipelineEngine over gloo), against the same job without the pipeline on 1 rank (same seed, same rows
in the same micro batches, fp32)."""
import json

import pytest
import torch

from e2e_helpers import launch, launch_and_stop_at, load_safetensors, metrics, train_records

pytestmark = pytest.mark.e2e

STEPS = 6
# 2 micro batches of 2 rows per step on both: the pipe (2 stages x 1 replica) and the plain run (1 rank).
JOB = ("method=sft", f"train.max_steps={STEPS}", "method.seq_len=64", "method.micro_batch_size=2",
       "method.global_batch_size=4", "zero=stage1", "train.save_every=3", "train.keep_last=3",
       "train.eval_every=3", "data.eval_fraction=0.05", "train.eval_batches=2")
PIPE = (*JOB, "hw.gpus_per_node=2", "train.pipeline_parallel=2", "train.pipeline_partition=uniform")
PLAIN = (*JOB, "hw.gpus_per_node=1")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The pipeline run is stopped (Slurm's pre-time-limit signal) after step 2 and resumed, the second
    time with activation checkpointing per layer: neither may change a loss."""
    root = tmp_path_factory.mktemp("pipe")
    assert launch_and_stop_at(root / "pipe", 2, *PIPE) == 3  # stopped: checkpointed at the step it reached
    assert len(train_records(root / "pipe")) < STEPS
    launch(root / "pipe", *PIPE, "train.gradient_checkpointing=true")
    launch(root / "plain", *PLAIN)
    return root


def _losses(run_dir):
    return [m["loss"] for m in train_records(run_dir)]


def test_two_stages_give_the_losses_of_the_plain_run_across_a_resume(runs):
    pipe, plain = _losses(runs / "pipe"), _losses(runs / "plain")
    assert len(pipe) == len(plain) == STEPS
    assert pipe == pytest.approx(plain, rel=1e-5, abs=1e-5)
    assert pipe[-1] < pipe[0]
    record = train_records(runs / "pipe")[-1]
    assert record["grad_norm"] > 0 and record["tokens_per_sec_per_gpu"] > 0
    evals = [[m["eval_loss"] for m in metrics(runs / name) if "eval_loss" in m] for name in ("pipe", "plain")]
    assert len(evals[0]) >= 2 and evals[0][-2:] == pytest.approx(evals[1][-2:], rel=1e-5)  # eval_batch
    info = json.loads((runs / "pipe/run_info.json").read_text())
    assert info["total_params"] == json.loads((runs / "plain/run_info.json").read_text())["total_params"]


def test_the_pipeline_exports_hf_weights_equal_to_the_plain_runs(runs):
    pipe = load_safetensors(runs / "pipe/final/model.safetensors")
    plain = load_safetensors(runs / "plain/final/model.safetensors")
    assert pipe.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(pipe[key], plain[key], rtol=1e-4, atol=1e-5, msg=key)
    config = json.loads((runs / "pipe/final/config.json").read_text())
    assert config["model_type"] == "llama" and (runs / "pipe/final/tokenizer_config.json").is_file()
    # Every stage wrote its layers into the checkpoint: embedding, 4 decoder layers, norm + head.
    layers = sorted(p.name for p in (runs / f"pipe/checkpoints/step_{STEPS:08d}").glob("layer_*"))
    assert len(layers) == 6


def test_two_stages_by_two_replicas_match_two_data_parallel_ranks(tmp_path):
    """4 ranks (pipe-major: ranks 0-1 stage 0, ranks 2-3 stage 1): each replica's two stages read the same
    rows, and gradients average over the replicas as with plain data parallelism on 2 ranks."""
    job = ("method=sft", "train.max_steps=3", "method.seq_len=64", "method.micro_batch_size=2",
           "method.global_batch_size=8", "zero=stage1", "train.export=false")
    launch(tmp_path / "pipe", *job, "hw.gpus_per_node=4", "train.pipeline_parallel=2")
    launch(tmp_path / "dp", *job, "hw.gpus_per_node=2")
    assert _losses(tmp_path / "pipe") == pytest.approx(_losses(tmp_path / "dp"), rel=1e-5, abs=1e-5)
