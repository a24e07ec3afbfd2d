"""Families as their users have them: remote-code model directories load with the Auto class their code
registers, only when the preset trusts remote code; a family hpcllm cannot build needs model.path."""
import re
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hpcllm.config import compose, derive
from hpcllm.launch.job import launch_refusals
from hpcllm.models.build import auto_class, build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from remote_code_model import write_remote_code_model  # noqa: E402


def _model_cfg(path, trust: bool):
    model = compose(["model=chatglm_6b"]).model
    return OmegaConf.merge(model, {"path": str(path), "trust_remote_code": trust})


def test_a_model_whose_code_registers_only_automodel_loads_with_it(tmp_path):
    marker = tmp_path / "code_ran"
    path = write_remote_code_model(tmp_path / "chatglm_like", registers=("AutoModel",), marker=marker)
    assert auto_class(str(path)).__name__ == "AutoModel"
    model = build_model(_model_cfg(path, trust=True))
    assert type(model).__name__ == "TinyRemoteModel" and marker.exists()
    out = model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, 64) and torch.isfinite(out.loss)


def test_a_model_registering_the_causal_lm_class_uses_it(tmp_path):
    path = write_remote_code_model(tmp_path / "baichuan_like", registers=("AutoModelForCausalLM",),
                                   marker=tmp_path / "ran")
    assert auto_class(str(path)).__name__ == "AutoModelForCausalLM"
    assert type(build_model(_model_cfg(path, trust=True))).__name__ == "TinyRemoteModel"


def test_remote_code_does_not_run_unless_the_preset_trusts_it(tmp_path):
    marker = tmp_path / "code_ran"
    path = write_remote_code_model(tmp_path / "untrusted", marker=marker)
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_model(_model_cfg(path, trust=False))
    assert not marker.exists()


def test_a_remote_code_family_without_a_path_is_refused_before_launch(tmp_path):
    cfg = compose(["model=chatglm3_6b", "hw=a100x8", f"data.train={tmp_path}/sft.jsonl"])
    derive(cfg)
    assert [r for r in launch_refusals(cfg) if re.search("ships its own code.*set model.path=", r)]


def test_tensor_parallel_is_planned_but_never_launched(tmp_path):
    key = "train.tensor_parallel"  # pipeline parallelism trains (tests/unit/test_pipeline_model.py)
    cfg = compose(["model=llama2_7b", "hw=a100x8", "zero=stage1", f"data.train={tmp_path}/sft.jsonl", f"{key}=2"])
    derive(cfg)  # the estimate still plans it (dry runs)
    assert [r for r in launch_refusals(cfg) if f"{key}=2: the training loop has no tensor parallelism" in r]
