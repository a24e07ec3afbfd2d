"""Calibrate hpcllm.plan against real tensors on this CPU: predicted vs measured bytes.

For tiny and small models built from config (random weights, fp32, as the CPU ranks train):
- parameters, gradients and AdamW states are counted exactly in bytes after one optimizer step and
  compared with the ZeRO-0 fp32 model-state terms;
- the tensors autograd saves for backward are counted exactly (saved-tensor hooks, each storage once)
  and compared with the activation terms plus the saved part of the loss (final hidden states and the
  fp32 log-softmax output);
- the transient peak: each case runs in a fresh process with large allocations mmapped (so freed
  memory leaves RSS at once); after a first step has made gradients and AdamW states resident (as
  DeepSpeed does at start-up), a sampling thread records the peak RSS growth over a second step,
  compared with the predicted activations + logits (no fragmentation factor: glibc, not the CUDA
  caching allocator).

Each CPU case fails (non-zero exit) unless the model states are exact and the step peak is within 25 %.

GPU grid (``--gpu``, when a GPU machine is lent): a 1B-class LLaMA (TinyLlama-1.1B's shape) trained by
hpcllm's own pieces (the stage's model with its adapter, the rendered ds_config, deepspeed.initialize) on
random tokens, over ZeRO 0-3 with and without offload, full / LoRA / P-tuning, checkpointing on and off,
on 1 and 2 GPUs (torchrun); each case reports peak allocated and reserved memory and the median step time
against the pre-flight's prediction for the same job on ``--hw`` (its memory set to the device's), and
the ratios predicted/measured go to ``--out`` (JSON lines) and a Markdown table on stdout.

Run: .venv/bin/python bench/bench_estimate.py                       # CPU calibration
     .venv/bin/python bench/bench_estimate.py --gpu --gpus 1,2 --out bench_gpu.jsonl [--quick]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if "--gpu" not in sys.argv and "--gpu-case" not in sys.argv:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from hpcllm.config import compose, derive  # noqa: E402
from hpcllm.models.build import hf_config_kwargs  # noqa: E402
from hpcllm.plan import formulas as F  # noqa: E402
from hpcllm.plan.estimate import memory_breakdown  # noqa: E402

CASES = [  # (label, overrides)
    ("tiny_llama sdpa", ["model=tiny_llama", "method.seq_len=128", "method.micro_batch_size=2"]),
    ("tiny_llama eager", ["model=tiny_llama", "train.attention=eager", "method.seq_len=128",
                          "method.micro_batch_size=2"]),
    ("tiny_gpt2 eager", ["model=tiny_gpt2", "train.attention=eager", "method.seq_len=128",
                         "method.micro_batch_size=2"]),
    ("tiny_mixtral sdpa", ["model=tiny_mixtral", "method.seq_len=128", "method.micro_batch_size=2"]),
    ("small llama sdpa", ["model=tiny_llama", "model.num_layers=8", "model.hidden_size=512", "model.num_heads=8",
                          "model.num_kv_heads=4", "model.intermediate_size=1376", "model.vocab_size=32000",
                          "method.seq_len=256", "method.micro_batch_size=4"]),
    ("small llama eager", ["model=tiny_llama", "model.num_layers=8", "model.hidden_size=512", "model.num_heads=8",
                           "model.num_kv_heads=4", "model.intermediate_size=1376", "model.vocab_size=32000",
                           "method.seq_len=256", "method.micro_batch_size=4", "train.attention=eager"]),
]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class _PeakRss(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.base, self.peak, self.running = _rss_bytes(), 0, True

    def run(self):
        while self.running:
            self.peak = max(self.peak, _rss_bytes() - self.base)
            time.sleep(0.0005)

    def stop(self) -> int:
        self.running = False
        self.join()
        return self.peak


def _saved_bytes(model, ids) -> tuple[int, torch.Tensor]:
    storages = {}

    def pack(t):
        if t.device.type == "cpu" and not isinstance(t, torch.nn.Parameter) and t.untyped_storage().data_ptr():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    return sum(n for ptr, n in storages.items() if ptr not in params), loss


def measure(overrides):
    cfg = compose(["hw=cpu", "zero=stage0", "method=sft", "hw.gpus_per_node=1"] + overrides)
    derived = derive(cfg)
    m = cfg.model
    config = AutoConfig.for_model(m.hf_model_type, **hf_config_kwargs(m))
    model = AutoModelForCausalLM.from_config(config, attn_implementation=cfg.train.attention)
    model.train()
    b, s = cfg.method.micro_batch_size, cfg.method.seq_len
    ids = torch.randint(0, m.vocab_size, (b, s))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    saved, loss = _saved_bytes(model, ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    del loss
    gc.collect()
    sampler = _PeakRss()
    sampler.start()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    rss_growth = sampler.stop()
    measured = {
        "parameters": sum(p.numel() * p.element_size() for p in model.parameters()),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None),
        "optimizer": sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                         if torch.is_tensor(v) and v.dim() > 0),
        "saved activations": saved,
    }
    gpu, _ = memory_breakdown(cfg, derived, b)
    arch = F.arch_of(m)
    predicted = {k: gpu[k] for k in ("parameters", "gradients", "optimizer")}
    predicted["saved activations"] = gpu["activations"] + b * s * (4 * arch.hidden + 4 * arch.vocab)
    measured["step peak (RSS)"], predicted["step peak (RSS)"] = rss_growth, gpu["activations"] + gpu["logits"]
    return measured, predicted


STEP_PEAK_TOLERANCE = 0.25


def run_case(index: int) -> int:
    """Print one CPU case; non-zero when model states are not exact or the step peak is off by > 25 %."""
    torch.manual_seed(0)
    label, overrides = CASES[index]
    t0 = time.time()
    measured, predicted = measure(overrides)
    for term in measured:
        ratio = predicted[term] / measured[term] if measured[term] else float("nan")
        print(f"{label:<20s} {term:<18s} {predicted[term] / 1e6:13.3f} {measured[term] / 1e6:12.3f} {ratio:6.2f}")
    print(f"{label:<20s} ({time.time() - t0:.1f} s)", flush=True)
    wrong = [t for t in ("parameters", "gradients", "optimizer") if predicted[t] != measured[t]]
    peak = predicted["step peak (RSS)"] / measured["step peak (RSS)"] - 1
    if wrong or abs(peak) > STEP_PEAK_TOLERANCE:
        print(f"{label}: model states not exact ({wrong}) or step peak {peak:+.0%} outside "
              f"{STEP_PEAK_TOLERANCE:.0%}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# GPU grid
# ---------------------------------------------------------------------------------------------

LLAMA_1B = ["model=tiny_llama", "model.num_layers=22", "model.hidden_size=2048", "model.num_heads=32",
            "model.num_kv_heads=4", "model.intermediate_size=5632", "model.vocab_size=32000",
            "model.max_positions=4096", "model.tokenizer=null"]


def gpu_grid(gpus: list[int], quick: bool) -> list[tuple[str, list[str]]]:
    """(label, overrides) of each GPU case: ZeRO 0-3 and offload x full / LoRA / P-tuning x checkpointing,
    on each GPU count (``quick``: full fine-tuning without checkpointing plus one case per adapter)."""
    zeros = ["stage0", "stage1", "stage2", "stage3", "stage2_offload", "stage3_offload"]
    methods = ["sft", "lora", "ptuning"]
    cases = []
    for n in gpus:
        for method in methods:
            for zero in zeros:
                for gc in (False, True):
                    if quick and (gc or (method != "sft" and zero != "stage2")):
                        continue
                    if n == 1 and zero in ("stage1",):
                        continue  # one rank: stage 1 partitions nothing stage 0 does not
                    label = f"{n}gpu {method} {zero}{' gc' if gc else ''}"
                    cases.append((label, [f"hw.gpus_per_node={n}", f"method={method}", f"zero={zero}",
                                          f"train.gradient_checkpointing={str(gc).lower()}"]))
    return cases


def gpu_job(overrides: list[str], args):
    """The job of one grid case; ``--tiny`` keeps the bundled tiny LLaMA (a smoke run of the plumbing on CPU)."""
    precision = []
    if torch.cuda.is_available():
        precision = ["train.precision=" + ("bf16" if torch.cuda.is_bf16_supported() else "fp16")]
    model = ["model=tiny_llama"] if args.tiny else LLAMA_1B
    return compose(model + [f"hw={args.hw}", f"method.seq_len={args.seq}", f"method.micro_batch_size={args.micro}",
                            "train.export=false", "preflight=off"] + precision + overrides)


def measure_gpu(cfg, steps: int) -> dict:
    """Peak allocated/reserved bytes and the median step time of hpcllm's model and ds_config on this rank
    (DeepSpeed's accelerator API, so the same code runs on CPU ranks for a smoke run)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from hpcllm import distributed
    from hpcllm.models.build import building_under
    from hpcllm.render.deepspeed import render_ds_config
    from hpcllm.stages.base import StageContext
    from hpcllm.stages.lm import build_policy

    derived = derive(cfg)
    dist = distributed.from_environment()
    distributed.init(dist, cfg.hw.accelerator)
    ds_config = render_ds_config(cfg, derived)
    zero3 = ds_config if cfg.zero.stage == 3 and cfg.train.zero_init else None
    with tempfile.TemporaryDirectory() as run_dir:
        ctx = StageContext(cfg, derived, Path(run_dir), dist, {}, None)
        with building_under(zero3):
            model = build_policy(ctx)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                          model_parameters=[p for p in model.parameters() if p.requires_grad])
    acc = get_accelerator()
    b, s = cfg.method.micro_batch_size, cfg.method.seq_len
    times = []
    for step in range(steps + 2):
        if step == 2:  # after start-up allocations (optimizer states, buckets) settle
            acc.reset_peak_memory_stats()
        acc.synchronize()
        start = time.perf_counter()
        for _ in range(derived.grad_accum_steps):
            ids = torch.randint(0, cfg.model.vocab_size, (b, s), device=engine.device)
            loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            engine.backward(loss)
            engine.step()
        acc.synchronize()
        times.append(time.perf_counter() - start)
    return {"allocated": acc.max_memory_allocated(), "reserved": acc.max_memory_reserved(),
            "step_time_s": statistics.median(times[2:]), "rank": dist.rank}


def gpu_case(label: str, overrides: list[str], args) -> None:
    """One case in this torchrun process group; rank 0 appends predicted, measured and ratios to --out."""
    from hpcllm.plan import estimate

    cfg = gpu_job(overrides, args)
    if torch.cuda.is_available():
        cfg.hw.gpu_mem_gb = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    measured = measure_gpu(cfg, args.steps)
    if measured["rank"] != 0:
        return
    est = estimate(cfg, derive(cfg), with_remedies=False)
    gib = 2**30
    context = est.breakdown.get("context", 0) * gib
    # The allocator's reserve is what nvidia-smi and OOMs see, less the CUDA context torch does not count.
    predicted_reserved = est.gpu_mem_gb * gib - context
    predicted_allocated = predicted_reserved - est.breakdown.get("fragmentation", 0) * gib
    row = {"case": label, "overrides": overrides, "seq_len": args.seq, "micro_batch": args.micro, "hw": args.hw,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "predicted": {"allocated_gb": predicted_allocated / gib, "reserved_gb": predicted_reserved / gib,
                         "step_time_s": est.step_time_s, "bound": est.bound},
           "measured": {"allocated_gb": measured["allocated"] / gib, "reserved_gb": measured["reserved"] / gib,
                        "step_time_s": measured["step_time_s"]}}
    row["ratio"] = {k: row["predicted"][k] / row["measured"][k] for k in ("allocated_gb", "reserved_gb", "step_time_s")
                    if row["measured"][k]}
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


def gpu_table(path: str) -> str:
    rows = [json.loads(line) for line in open(path)]
    lines = ["| case | allocated pred/meas GB | reserved pred/meas GB | step s pred/meas | ratios (alloc, reserved, time) |",
             "|---|---|---|---|---|"]
    for r in rows:
        p, m, q = r["predicted"], r["measured"], r["ratio"]
        lines.append(f"| {r['case']} | {p['allocated_gb']:.2f} / {m['allocated_gb']:.2f} | {p['reserved_gb']:.2f} / "
                     f"{m['reserved_gb']:.2f} | {p['step_time_s']:.3g} / {m['step_time_s']:.3g} | "
                     f"{q.get('allocated_gb', float('nan')):.2f}, {q.get('reserved_gb', float('nan')):.2f}, "
                     f"{q.get('step_time_s', float('nan')):.2f} |")
    return "\n".join(lines)


def run_gpu_grid(args) -> int:
    cases = gpu_grid([int(n) for n in args.gpus.split(",")], args.quick)
    Path(args.out).unlink(missing_ok=True)
    failed = []
    for index, (label, _) in enumerate(cases):
        n = int(label.split("gpu")[0])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__, "--gpu-case", str(index),
               "--gpus", args.gpus, "--hw", args.hw, "--seq", str(args.seq), "--micro", str(args.micro),
               "--steps", str(args.steps), "--out", args.out] + (["--quick"] if args.quick else []) + \
            (["--tiny"] if args.tiny else [])
        print(f"[{index + 1}/{len(cases)}] {label}", flush=True)
        if subprocess.run(cmd, timeout=args.case_timeout).returncode:
            failed.append(label)
    if Path(args.out).exists():
        print(gpu_table(args.out))
    if failed:
        print(f"failed cases: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", type=int, help="run one CPU case (internal)")
    parser.add_argument("--gpu", action="store_true", help="the GPU grid instead of the CPU calibration")
    parser.add_argument("--gpu-case", type=int, help="run one GPU case under torchrun (internal)")
    parser.add_argument("--gpus", default="1,2", help="GPU counts of the grid, e.g. 1,2")
    parser.add_argument("--quick", action="store_true", help="a short grid: full fine-tuning, one case per adapter")
    parser.add_argument("--hw", default="h100x8", help="hw preset the prediction uses (memory set to the device's)")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--case-timeout", type=int, default=600)
    parser.add_argument("--tiny", action="store_true", help="the tiny LLaMA instead of 1B (smoke run, e.g. --hw cpu)")
    parser.add_argument("--out", default="bench_estimate_gpu.jsonl")
    args = parser.parse_args()
    if args.case is not None:
        return run_case(args.case)
    if args.gpu_case is not None:
        label, overrides = gpu_grid([int(n) for n in args.gpus.split(",")], args.quick)[args.gpu_case]
        gpu_case(label, overrides, args)
        return 0
    if args.gpu:
        return run_gpu_grid(args)
    print(f"{'case':<20s} {'term':<18s} {'predicted MB':>13s} {'measured MB':>12s} {'ratio':>6s}", flush=True)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    codes = [subprocess.run([sys.executable, __file__, "--case", str(i)], env=env).returncode
             for i in range(len(CASES))]
    return 1 if any(codes) else 0


if __name__ == "__main__":
    sys.exit(main())
