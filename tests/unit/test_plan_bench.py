"""bench/bench_estimate.py's GPU grid: every case is a valid job the pre-flight predicts, and the table of
ratios reads back what the cases wrote (the measurements themselves need a GPU; `--gpu --tiny --hw cpu`
runs the same plumbing on CPU ranks by hand)."""
import argparse
import importlib.util
import json

import pytest

from hpcllm.config import PROJECT_ROOT, derive
from hpcllm.plan import estimate


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_estimate", f"{PROJECT_ROOT}/bench/bench_estimate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_covers_zero_offload_adapters_checkpointing_and_two_gpu_counts(bench):
    cases = bench.gpu_grid([1, 2], quick=False)
    labels = [label for label, _ in cases]
    assert len(labels) == len(set(labels))
    for part in ("1gpu", "2gpu", "sft", "lora", "ptuning", "stage0", "stage3", "stage2_offload", "stage3_offload",
                 " gc"):
        assert any(part in label for label in labels), part
    assert len(bench.gpu_grid([1, 2], quick=True)) < len(cases) / 4


def test_cases_are_jobs_the_preflight_predicts(bench):
    args = argparse.Namespace(tiny=False, hw="h100x8", seq=1024, micro=2)
    for label, overrides in bench.gpu_grid([1, 2], quick=False)[::4]:  # a sample: composing takes a while
        cfg = bench.gpu_job(overrides, args)
        est = estimate(cfg, derive(cfg), with_remedies=False)
        assert 1.0e9 < est.total_params < 1.2e9  # TinyLlama-1.1B's shape
        assert est.fits_gpu and est.step_time_s > 0, label


def test_table_reads_the_cases_back(bench, tmp_path):
    out = tmp_path / "grid.jsonl"
    row = {"case": "1gpu sft stage2", "predicted": {"allocated_gb": 10.0, "reserved_gb": 11.0, "step_time_s": 0.5},
           "measured": {"allocated_gb": 8.0, "reserved_gb": 10.0, "step_time_s": 0.4},
           "ratio": {"allocated_gb": 1.25, "reserved_gb": 1.1, "step_time_s": 1.25}}
    out.write_text(json.dumps(row) + "\n")
    table = bench.gpu_table(str(out))
    assert "| 1gpu sft stage2 | 10.00 / 8.00 | 11.00 / 10.00 | 0.5 / 0.4 | 1.25, 1.10, 1.25 |" in table
