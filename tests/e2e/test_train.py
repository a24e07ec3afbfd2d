"""Real training runs: `python launch.py` with 2 CPU ranks on DeepSpeed (gloo), tiny models.

Runs are shared between assertions (module-scoped fixtures) to keep the module to a few minutes.
"""
import shutil

import pytest
import torch

from hpcllm.config import compose
from hpcllm.models.build import build_model

from e2e_helpers import ROOT, launch, launch_and_stop_at, load_safetensors, metrics, train_records

pytestmark = pytest.mark.e2e

STEPS = 60
# Evaluation on a held-out 5% and a checkpoint every 20 steps exercise eval, keep-last and keep-best.
SFT = ("method=sft", f"train.max_steps={STEPS}", "train.save_every=20", "train.eval_every=20",
       "data.eval_fraction=0.05", "method.seq_len=64")
SHORT = ("train.max_steps=12", "method.seq_len=64")
FREEZE = ("method=freeze", "wandb.enabled=true", *SHORT)  # also logs to wandb (offline: no network here)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Lazily started runs, each once per module: name -> run dir."""
    done = {}

    def get(name, *overrides):
        if name not in done:
            run_dir = tmp_path_factory.mktemp("runs") / name
            launch(run_dir, *overrides)
            done[name] = run_dir
        return done[name]

    return get


def base_weights(model="tiny_llama"):
    """The seeded random weights every rank builds (the pad token's embedding row is zero)."""
    from hpcllm.data import load_tokenizer

    return build_model(compose([f"model={model}"]).model, tokenizer=load_tokenizer("demo")).state_dict()


def first_and_last_loss(run_dir):
    losses = [m["loss"] for m in train_records(run_dir)]
    return losses[0], sum(losses[-3:]) / 3


@pytest.mark.parametrize("method,extra", [
    ("sft", SFT), ("pretrain", ("method=pretrain", *SHORT)), ("lora", ("method=lora", *SHORT)),
    ("freeze", FREEZE), ("ptuning", ("method=ptuning", *SHORT))])
def test_every_method_trains_and_the_loss_falls(runs, method, extra):
    run_dir = runs(method, *extra)
    first, last = first_and_last_loss(run_dir)
    assert last < first - 0.05, f"{method}: loss did not fall ({first:.3f} -> {last:.3f})"
    record = train_records(run_dir)[-1]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec_per_gpu", "mfu", "tflops_per_gpu",
                "samples_per_sec", "memory_gb"):
        assert key in record
    assert record["tokens_per_sec_per_gpu"] > 0 and 0 < record["mfu"] < 1
    assert (run_dir / "final").is_dir()


def test_eval_keep_last_and_best(runs):
    run_dir = runs("sft", *SFT)
    evals = [m for m in metrics(run_dir) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [20, 40, 60]
    assert all(m["eval_ppl"] > 1 for m in evals)
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    best = min(evals, key=lambda m: m["eval_loss"])["step"]
    assert f"step_{STEPS:08d}" in kept and "step_00000040" in kept and f"step_{best:08d}" in kept
    assert len(kept) <= 3
    assert all((run_dir / "checkpoints" / k / "COMPLETE").is_file() for k in kept)


def test_full_export_loads_and_generates(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = runs("sft", *SFT) / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    prompt = tokenizer("1+1=", return_tensors="pt")
    out = model.generate(**prompt, min_new_tokens=4, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4
    assert (final / "hpcllm_config.yaml").is_file() and (final / "hpcllm_job.sbatch").is_file()


def test_lora_changes_only_the_adapter_and_exports_loadable(runs, tmp_path):
    from peft import AutoPeftModelForCausalLM

    final = runs("lora", "method=lora", *SHORT) / "final"
    base = base_weights()
    shipped = load_safetensors(final / "base" / "model.safetensors")
    assert all(torch.equal(shipped[k], base[k]) for k in shipped)
    adapter = load_safetensors(final / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it trained
    model = AutoPeftModelForCausalLM.from_pretrained(final)
    assert model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False).shape[1] == 6
    from tools.merge_lora import main as merge

    assert merge([str(final), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_freeze_trains_only_the_last_layers(runs):
    final = runs("freeze", *FREEZE) / "final"
    trained, base = load_safetensors(final / "model.safetensors"), base_weights()
    layers = compose(["model=tiny_llama", "method=freeze"])
    first_trainable = layers.model.num_layers - layers.method.freeze.trainable_layers
    for name, value in trained.items():
        trainable = any(name.startswith(f"model.layers.{i}.") for i in range(first_trainable, 4))
        assert torch.equal(value, base[name]) != trainable, name


def test_wandb_offline_run_is_written(runs):
    run_dir = runs("freeze", *FREEZE)
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline and offline[0].stat().st_size > 0


def test_mfu_counts_the_flops_the_estimate_counts(runs):
    """Freeze: layers below the trainable ones run no backward, which the estimate and MFU both count."""
    import json

    from hpcllm.plan.formulas import arch_of, flops_per_token

    run_dir = runs("freeze", *FREEZE)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["flops_per_token"] == json.loads((run_dir / "estimate.json").read_text())["flops_per_token"]
    cfg = compose(["method=freeze", "method.seq_len=64"])
    assert info["flops_per_token"] < flops_per_token(arch_of(cfg.model), 64)  # less than a full backward
    record = train_records(run_dir)[-1]
    achieved = record["tokens_per_sec_per_gpu"] * info["flops_per_token"]
    assert record["tflops_per_gpu"] == pytest.approx(achieved / 1e12, rel=1e-2)
    assert record["mfu"] == pytest.approx(achieved / (cfg.hw.peak_tflops_fp32 * 1e12), rel=1e-2)


def test_ptuning_trains_only_the_prefix(runs):
    import json

    run_dir = runs("ptuning", "method=ptuning", *SHORT)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert 0 < info["trainable_params"] < 0.01 * info["total_params"]
    base = base_weights()
    shipped = load_safetensors(run_dir / "final" / "base" / "model.safetensors")
    assert all(torch.equal(shipped[k], base[k]) for k in shipped)
    adapter = load_safetensors(run_dir / "final" / "adapter_model.safetensors")
    assert list(adapter) == ["prompt_embeddings"]


def test_zero_stages_give_the_same_loss_curve(runs):
    curves = {}
    for stage in (0, 1, 2, 3):
        run_dir = runs(f"zero{stage}", f"zero=stage{stage}", "train.max_steps=6", "method.seq_len=64",
                       "train.zero_init=false")  # the same seeded initial weights in every stage
        curves[stage] = [m["loss"] for m in train_records(run_dir)]
    for stage in (1, 2, 3):
        assert curves[stage] == pytest.approx(curves[0], rel=1e-3), f"stage {stage}: {curves[stage]} vs {curves[0]}"


def test_zero3_with_zero_init_trains_and_exports_full_weights(runs):
    from transformers import AutoModelForCausalLM

    run_dir = runs("zero3_init", "zero=stage3", *SHORT)
    first, last = first_and_last_loss(run_dir)
    assert last < first
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert model.model.embed_tokens.weight.shape == (4096, 128)  # gathered, not a partition


def test_mixed_pretrain_and_sft_log_each_loss(runs, tmp_path):
    run_dir = runs("mixed", *SHORT, f"data.pretrain={ROOT}/data/demo/pretrain.jsonl", "data.pretrain_ratio=0.25",
                   "method.global_batch_size=16")  # 4 micro steps per step: one pretraining, three SFT
    record = train_records(run_dir)[-1]
    assert "loss_sft" in record and "loss_pretrain" in record


def test_interrupted_twice_and_resumed_equals_uninterrupted(runs, tmp_path):
    straight = runs("sft", *SFT)
    run_dir = tmp_path / "interrupted"
    assert launch_and_stop_at(run_dir, 8, *SFT) == 3
    assert launch_and_stop_at(run_dir, 30, *SFT) == 3
    checkpoints = run_dir / "checkpoints"
    newest = sorted(p for p in checkpoints.glob("step_*") if (p / "COMPLETE").exists())[-1]
    # A save killed half-way: the files are there but COMPLETE is not. Resume must ignore it.
    partial = checkpoints / "step_00000059"
    shutil.copytree(newest, partial)
    (partial / "COMPLETE").unlink()
    out = launch(run_dir, *SFT).stdout
    assert f"resumed from {newest}" in out
    assert not partial.exists()  # pruned after the next complete save

    steps = [m["step"] for m in train_records(run_dir)]
    assert steps[-1] == STEPS and len(set(steps)) == STEPS  # every step logged once in all
    a = load_safetensors(straight / "final" / "model.safetensors")
    b = load_safetensors(run_dir / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_the_same_run_directory_runs_under_torchrun(tmp_path):
    """A rendered run directory is all a rank needs: torchrun (or srun) can start it directly."""
    import subprocess
    import sys

    from e2e_helpers import env

    from hpcllm.distributed import free_port

    launch(tmp_path, "dry_run=true", "train.max_steps=3", "method.seq_len=64")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}",
                           "-m", "hpcllm.launch.worker", str(tmp_path)], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in train_records(tmp_path)] == [1, 2, 3]
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_sparse_logging_averages_each_window_and_a_stop_waits_for_a_check_step(tmp_path):
    """log_every=8: one record (and one all-reduce) per 8 steps; stop_check_every=3: a stop signal is agreed
    on at the next multiple of 3 or of 8, checkpointed there, and the resumed run logs the same steps."""
    run_dir = tmp_path / "sparse"
    overrides = ("train.max_steps=24", "method.seq_len=64", "train.log_every=8", "train.stop_check_every=3",
                 "train.export=false")
    assert launch_and_stop_at(run_dir, 8, *overrides) == 3
    stopped_at = int(sorted((run_dir / "checkpoints").glob("step_*"))[-1].name.split("_")[1])
    assert 8 < stopped_at < 24 and (stopped_at % 3 == 0 or stopped_at % 8 == 0)
    assert [m["step"] for m in train_records(run_dir)] == list(range(8, stopped_at + 1, 8))
    out = launch(run_dir, *overrides).stdout
    assert f"resumed from {run_dir / 'checkpoints'}/step_{stopped_at:08d}" in out
    records = train_records(run_dir)
    assert [m["step"] for m in records] == [8, 16, 24]
    assert all(m["step_time_s"] > 0 and 0 < m["mfu"] < 1 and m["consumed_samples"] == m["step"] * 4 for m in records)
