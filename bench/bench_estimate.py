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

Run: .venv/bin/python bench/bench_estimate.py
"""
from __future__ import annotations

import gc
import os
import resource
import subprocess
import sys
import threading
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

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


def run_case(index: int) -> None:
    torch.manual_seed(0)
    label, overrides = CASES[index]
    t0 = time.time()
    measured, predicted = measure(overrides)
    for term in measured:
        ratio = predicted[term] / measured[term] if measured[term] else float("nan")
        print(f"{label:<20s} {term:<18s} {predicted[term] / 1e6:13.3f} {measured[term] / 1e6:12.3f} {ratio:6.2f}")
    print(f"{label:<20s} ({time.time() - t0:.1f} s)", flush=True)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        run_case(int(sys.argv[2]))
        return 0
    print(f"{'case':<20s} {'term':<18s} {'predicted MB':>13s} {'measured MB':>12s} {'ratio':>6s}", flush=True)
    for i in range(len(CASES)):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        subprocess.run([sys.executable, __file__, "--case", str(i)], check=True, env=env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
