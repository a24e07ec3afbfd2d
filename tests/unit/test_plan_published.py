"""hpcllm.plan against published fine-tuning memory and throughput (tests/unit/data/published_measurements.json).

Tolerance, honestly: published figures are nvidia-smi readings and step timings from other people's code
(their loaders, attention kernels, DeepSpeed configs), so we ask for OOM rows to be predicted not to fit,
every other memory row to be predicted to fit and within a third of the figure, and every throughput row
within half of it; the README reports the share within 25 % (memory) and 35 % (throughput), which
:func:`summary` computes and a test keeps in step with the README. Rows whose setup hpcllm cannot
express are kept in the table with the reason and only reported.
"""
import copy
import functools
import json
import os

import pytest
import yaml
from omegaconf import OmegaConf

from hpcllm.config import PROJECT_ROOT, compose, derive
from hpcllm.plan import estimate

TABLE = os.path.join(os.path.dirname(__file__), "data", "published_measurements.json")
TOLERANCE = 1 / 3
TIME_TOLERANCE = 1 / 2
REPORTED = {"memory": 0.25, "throughput": 0.35}  # the shares the README states

with open(TABLE) as f:
    DATA = json.load(f)
ROWS = [r for r in DATA["rows"] if not r.get("exclude") and "measured_gb" in r]
TIME_ROWS = [r for r in DATA["rows"] if not r.get("exclude_time") and "measured_tokens_per_s" in r]


@functools.lru_cache(maxsize=None)
def _compose_groups(groups):
    return compose(list(groups))


def _compose(overrides):
    """compose(), composing once per choice of presets and setting dotted keys on a copy (fast)."""
    groups = tuple(o for o in overrides if "." not in o.split("=")[0])
    cfg = copy.deepcopy(_compose_groups(groups))
    for o in overrides:
        key, value = o.split("=", 1)
        if "." in key:
            OmegaConf.update(cfg, key, yaml.safe_load(value), merge=False)
    return cfg


def _config(row):
    return _compose(DATA["sources"][row["source"]]["common"] + row["overrides"])


@functools.lru_cache(maxsize=None)
def _predict_id(row_id):
    row = next(r for r in DATA["rows"] if r["id"] == row_id)
    cfg = _config(row)
    return estimate(cfg, derive(cfg), with_remedies=False)


def _predict(row):
    return _predict_id(row["id"])


@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_published_row(row):
    est = _predict(row)
    if row["measured_gb"] == "OOM":
        assert not est.fits_gpu, f"{row['id']}: published OOM, predicted {est.gpu_mem_gb} GB fits"
        return
    assert est.fits_gpu, f"{row['id']}: ran in {row['measured_gb']} GB, predicted {est.gpu_mem_gb} GB does not fit"
    error = est.gpu_mem_gb / row["measured_gb"] - 1
    assert abs(error) <= TOLERANCE, f"{row['id']}: predicted {est.gpu_mem_gb:.1f} GB vs {row['measured_gb']} GB"


@pytest.mark.parametrize("row", TIME_ROWS, ids=[r["id"] for r in TIME_ROWS])
def test_published_throughput(row):
    est = _predict(row)
    error = est.tokens_per_sec_per_gpu / row["measured_tokens_per_s"] - 1
    assert abs(error) <= TIME_TOLERANCE, (f"{row['id']}: predicted {est.tokens_per_sec_per_gpu:.0f} tokens/s per GPU vs "
                                          f"{row['measured_tokens_per_s']}")


def test_communication_brings_the_two_node_rows_closer_than_flops_alone():
    """Baichuan2-13B under ZeRO-1 on two H800 nodes joined by one 200 Gb/s link: with 8 micro steps per
    step, the gradient reduction between the nodes takes a quarter of the step. FLOPs alone predict 70 %
    more throughput than published; with the collectives over the link the error is a quarter of that,
    and the gap between GAS 8 and GAS 64 (published 2068 vs 2710 tokens/s) is reproduced."""
    rows = {r["id"]: r for r in DATA["rows"]}
    errors = {}
    for gas in (8, 64):
        row = rows[f"flagperf-baichuan2-13b-zero1-h800x16-gas{gas}"]
        est = _predict(row)
        tokens = row["measured_tokens_per_s"]
        flops_only = est.tokens_per_sec_per_gpu * est.step_time_s / est.time_breakdown["compute"]
        errors[gas] = (est.tokens_per_sec_per_gpu / tokens - 1, flops_only / tokens - 1)
        assert abs(errors[gas][0]) < abs(errors[gas][1])
    assert errors[8][1] > 0.6 and abs(errors[8][0]) < 0.25
    assert _predict(rows["flagperf-baichuan2-13b-zero1-h800x16-gas8"]).tokens_per_sec_per_gpu < \
        _predict(rows["flagperf-baichuan2-13b-zero1-h800x16-gas64"]).tokens_per_sec_per_gpu


def test_fp32_load_rows_are_explained_by_the_load_peak():
    """The two ZeRO-3 offload rows published at 26-33 GB for a training peak of 7-9 GB: the fp32 load
    (model.load_dtype=fp32 without zero.Init) sets them, and the estimate warns about it."""
    for row_id in ("chatglm6b-full-zero3off-4gpu-gc", "chatglm2-full-zero3off-4gpu-gc"):
        est = _predict_id(row_id)
        assert est.breakdown["zero3_load"] > 10
        assert any("model.load_dtype=fp32" in n for n in est.notes)


def summary():
    """Share of rows within the reported tolerances and the rows outside, per kind (for the README)."""
    out = {}
    for kind, key, rows, excluded in (
            ("memory", "measured_gb", [r for r in ROWS if r["measured_gb"] != "OOM"], "exclude"),
            ("throughput", "measured_tokens_per_s", TIME_ROWS, "exclude_time")):
        errors = {}
        for r in rows:
            est = _predict(r)
            value = est.gpu_mem_gb if kind == "memory" else est.tokens_per_sec_per_gpu
            errors[r["id"]] = value / r[key] - 1
        inside = [i for i, e in errors.items() if abs(e) <= REPORTED[kind]]
        out[kind] = {"rows": len(errors), "within": len(inside),
                     "outside": {i: round(e, 3) for i, e in errors.items() if i not in inside},
                     "excluded": [r["id"] for r in DATA["rows"] if r.get(excluded) and key in r]}
    return out


def test_readme_reports_the_shares_it_claims():
    readme = " ".join(open(os.path.join(PROJECT_ROOT, "README.md")).read().split())
    for kind, s in summary().items():
        claim = f"{s['within']} of {s['rows']} {kind} rows within {int(REPORTED[kind] * 100)} %"
        assert claim in readme, f"README should say '{claim}' (outside: {s['outside']})"
        for row_id in s["outside"]:
            assert row_id in readme, f"README should name {row_id}, outside the {kind} tolerance"
    ooms = sum(r["measured_gb"] == "OOM" for r in ROWS)
    assert f"all {ooms} published OOMs predicted not to fit" in readme


def test_table_is_sourced_and_covers_every_adapter():
    for row in DATA["rows"]:
        assert DATA["sources"][row["source"]]["cite"]
        assert "measured_gb" in row or "measured_tokens_per_s" in row
    methods = {o.split("=")[1] for r in ROWS for o in DATA["sources"][r["source"]]["common"] + r["overrides"]
               if o.startswith("method=")}
    assert {"sft", "lora", "freeze", "ptuning"} <= methods
    assert any(r["measured_gb"] == "OOM" for r in ROWS)
    assert len(TIME_ROWS) >= 8


if __name__ == "__main__":
    print(json.dumps(summary(), indent=1))
