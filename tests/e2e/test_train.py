"""Real training runs: `python launch.py` with 2 CPU ranks on DeepSpeed (gloo), tiny models.

Runs are shared between assertions (module-scoped fixtures) to keep the module to a few minutes.
"""
import math
import shutil

import pytest
import torch

from hpcllm.config import compose
from hpcllm.models.build import build_model

from e2e_helpers import ROOT, launch, launch_and_stop_at, load_safetensors, metrics, train_records, wandb_history

pytestmark = pytest.mark.e2e

STEPS = 60
# Evaluation on a held-out 5% and a checkpoint every 20 steps exercise eval, keep-last and keep-best.
SFT = ("method=sft", f"train.max_steps={STEPS}", "train.save_every=20", "train.eval_every=20",
       "data.eval_fraction=0.05", "method.seq_len=64")
SHORT = ("train.max_steps=12", "method.seq_len=64")
FREEZE = ("method=freeze", "wandb.enabled=true", *SHORT)  # also logs to wandb (offline: no network here)
# 16 virtual tokens on a random model learn slowly: 12 steps lower the loss by less than the noise (measured
# 8.25 -> 8.31 at 12 steps, 8.25 -> ~8.1 at 40 with the whole-text tokenization of this wave).
PTUNING = ("method=ptuning", "train.max_steps=40", "method.seq_len=64")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Lazily started runs, each once per module: name -> run dir. A name is one set of overrides: asking
    for it with others is a test bug, which fails here rather than silently reusing the other run."""
    done, asked = {}, {}

    def get(name, *overrides):
        if asked.setdefault(name, overrides) != overrides:
            raise AssertionError(f"run {name!r} was started with {asked[name]}, now asked with {overrides}")
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
    ("freeze", FREEZE), ("ptuning", PTUNING)])
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
    assert all(m["eval_ppl"] == pytest.approx(math.exp(m["eval_loss"]), rel=1e-5) for m in evals)
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
    from transformers import AutoModelForCausalLM

    from tools.merge_lora import main as merge

    assert merge([str(final), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_lora_leaves_the_base_weights_of_the_trained_engine_untouched(runs):
    """The DeepSpeed checkpoint's own module, not the shipped copy: frozen tensors equal the starting weights."""
    run_dir = runs("lora", "method=lora", *SHORT)
    states = sorted((run_dir / "checkpoints").glob("step_*/mp_rank_00_model_states.pt"))
    module = torch.load(states[-1], map_location="cpu", weights_only=False)["module"]
    base = base_weights()
    frozen = {k: v for k, v in module.items() if "lora_" not in k}
    assert len(frozen) == len(base)
    for key, value in frozen.items():
        name = key.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(value, base[name]), name


def _chat(final, prompts, tmp_path):
    import json
    import subprocess
    import sys

    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    out = tmp_path / f"answers_{final.parent.name}.jsonl"
    proc = subprocess.run([sys.executable, "tools/chat.py", str(final), f"prompts={tmp_path / 'prompts.jsonl'}",
                           f"output={out}", "temperature=0", "max_new_tokens=6"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize("name,overrides", [("sft", SFT), ("lora", ("method=lora", *SHORT))])
def test_chat_answers_as_the_model_generates_in_its_training_format(runs, name, overrides, tmp_path):
    from hpcllm.models.generate import ChatModel, Conversation, Sampling

    final = runs(name, *overrides) / "final"
    prompts = [{"prompt": "What is 1+1?"}, {"instruction": "Translate", "input": "hello"},
               {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                             {"role": "user", "content": "more"}]}]
    answers = _chat(final, prompts, tmp_path)
    chat = ChatModel(final)  # the same weights (an adapter on its base for LoRA), greedy, by hand
    assert chat.format_id == "alpaca"  # the format the run trained with (tiny_llama's)
    conv = Conversation(None, [{"role": "user", "content": "What is 1+1?"}])
    text = chat.prompt_text(conv)
    assert text.startswith(chat.tokenizer.bos_token) and text.endswith("### Instruction:\nWhat is 1+1?\n\n### Response:\n")
    ids = chat.encode(conv)
    out = chat.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                              pad_token_id=chat.tokenizer.pad_token_id)
    assert answers[0]["response"] == chat.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert answers[0]["response"] == chat.reply(conv, Sampling(max_new_tokens=6, temperature=0))
    assert "### Input:\nhello" in chat.prompt_text(Conversation(None, [{"role": "user", "content": "Translate",
                                                                         "input": "hello"}]))
    assert all(isinstance(a["response"], str) for a in answers) and len(answers) == 3


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
    assert len(offline) == 1
    logged = {}
    for row in wandb_history(offline[0]):  # read back: every metrics.jsonl value, at its step
        logged.setdefault(row["_step"], {}).update(row)
    for record in metrics(run_dir):
        step = record.pop("step")
        assert step in logged, f"step {step} is not in the wandb history"
        for key, value in record.items():
            assert logged[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)
    assert sorted(logged) == sorted(m["step"] for m in metrics(run_dir))


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

    run_dir = runs("ptuning", *PTUNING)
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


def test_a_finished_run_is_left_alone_and_a_damaged_checkpoint_is_skipped(runs, tmp_path):
    """Issue 13, items 2, 4 and 12 on a real run: a relaunch of the finished SFT run changes nothing; with
    its newest checkpoint damaged, a longer run with another lr and micro batch falls back to the previous
    one, keeps the data position in samples and trains with the new schedule."""
    import json

    from hpcllm.train.schedule import WarmupDecay

    run_dir = tmp_path / "sft"
    shutil.copytree(runs("sft", *SFT), run_dir)
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    out = launch(run_dir, *SFT).stdout
    assert f"{run_dir} is complete: trained to step {STEPS}" in out
    assert all(p.read_bytes() == data for p, data in files.items()) and not (run_dir / "run.lock").exists()

    latest = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    shard = latest / "mp_rank_00_model_states.pt"
    shard.write_bytes(b"not a pickle" + shard.read_bytes()[12:])
    previous = max(p for p in (run_dir / "checkpoints").glob("step_*") if p != latest)
    resumed_at = int(previous.name.split("_")[1])
    longer = [o for o in SFT if not o.startswith("train.max_steps")] + [f"train.max_steps={STEPS + 4}"]
    out = launch(run_dir, *longer, "method.lr=5e-4", "method.micro_batch_size=1").stdout
    assert f"checkpoint {latest} is damaged" in out and f"resumed from {previous} at step {resumed_at}" in out
    assert "method.lr 0.001 -> 0.0005" in out
    after = [m for m in train_records(run_dir) if m["step"] > resumed_at][-(STEPS + 4 - resumed_at):]
    assert [m["step"] for m in after] == list(range(resumed_at + 1, STEPS + 5))
    # 4 samples a step before (micro 2 x 2 ranks), 2 after: the position continues, nothing trained twice.
    assert [m["consumed_samples"] for m in after] == [resumed_at * 4 + 2 * i for i in range(1, len(after) + 1)]
    schedule = WarmupDecay(2, STEPS + 4, "cosine", 0.1)  # the new lr and length, at the resumed step
    expected = [5e-4 * schedule(m["step"]) for m in after]
    assert [m["lr"] for m in after] == pytest.approx(expected, rel=1e-2)  # metrics.jsonl keeps 3 digits
    assert (latest / "COMPLETE").is_file() and not any(p.name.endswith((".next", ".replaced"))
                                                       for p in (run_dir / "checkpoints").iterdir())
    assert "lr: 0.0005" in (run_dir / "config.yaml").read_text()
    assert json.loads((run_dir / "config_changes.jsonl").read_text())["resumed_at_step"] == resumed_at


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
