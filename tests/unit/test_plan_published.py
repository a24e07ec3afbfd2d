"""hpcllm.plan against published fine-tuning memory figures (tests/unit/data/published_measurements.json).

Tolerance, honestly: published figures are nvidia-smi readings from other people's code (their loaders,
attention kernels, DeepSpeed configs), so we ask for OOM rows to be predicted not to fit and every other
row to be predicted to fit and within a third of the figure. Today's worst included row is 27 % under,
the median about 6 % under; rows whose setup hpcllm cannot express are kept in the table with the
reason and only reported.
"""
import copy
import functools
import json
import os

import pytest
import yaml
from omegaconf import OmegaConf

from hpcllm.config import compose, derive
from hpcllm.plan import estimate

TABLE = os.path.join(os.path.dirname(__file__), "data", "published_measurements.json")
TOLERANCE = 1 / 3

with open(TABLE) as f:
    DATA = json.load(f)
ROWS = [r for r in DATA["rows"] if not r.get("exclude")]


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


def _predict(row):
    cfg = _compose(DATA["sources"][row["source"]]["common"] + row["overrides"])
    return estimate(cfg, derive(cfg), with_remedies=False)


@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_published_row(row):
    est = _predict(row)
    if row["measured_gb"] == "OOM":
        assert not est.fits_gpu, f"{row['id']}: published OOM, predicted {est.gpu_mem_gb} GB fits"
        return
    assert est.fits_gpu, f"{row['id']}: ran in {row['measured_gb']} GB, predicted {est.gpu_mem_gb} GB does not fit"
    error = est.gpu_mem_gb / row["measured_gb"] - 1
    assert abs(error) <= TOLERANCE, f"{row['id']}: predicted {est.gpu_mem_gb:.1f} GB vs {row['measured_gb']} GB"


def test_table_is_sourced_and_covers_every_adapter():
    for row in DATA["rows"]:
        assert DATA["sources"][row["source"]]["cite"]
    methods = {o.split("=")[1] for r in ROWS for o in DATA["sources"][r["source"]]["common"] + r["overrides"]
               if o.startswith("method=")}
    assert {"sft", "lora", "freeze", "ptuning"} <= methods
    assert any(r["measured_gb"] == "OOM" for r in ROWS)
