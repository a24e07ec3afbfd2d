"""Recipes: every model x method composes to published hyper-parameters with a source for each value;
tiny models keep the demo values; a value the user sets always wins."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hpcllm.config import ConfigError, compose, derive
from hpcllm.config.recipes import method_kind
from hpcllm.launch.job import launch_refusals
from hpcllm.train.schedule import warmup_steps

ROOT = Path(__file__).resolve().parents[2]
MODELS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
REAL_MODELS = [m for m in MODELS if not m.startswith("tiny_")]

# Documented ranges (README "Recipes"): what the published recipes of each kind use.
LR_RANGE = {"pretrain": (1e-4, 6e-4), "sft": (5e-6, 3e-5), "lora": (5e-5, 3e-4), "freeze": (1e-5, 2e-4),
            "ptuning": (5e-3, 3e-2), "reward": (1e-6, 2e-4), "dpo": (1e-7, 1e-5), "ppo": (1e-6, 2e-5), "eval": (0, 0)}


def _job(*overrides):
    cfg = compose(["hw=a100x8", *overrides])
    return cfg, derive(cfg)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", REAL_MODELS)
def test_every_published_recipe_composes_in_its_documented_range(model, method):
    overrides = [f"model={model}", f"method={method}"]
    if method == "ptuning" and not compose(overrides).model.supports_ptuning:
        pytest.skip(f"{model} has no P-tuning")
    cfg, derived = _job(*overrides)
    m, kind = cfg.method, method_kind(cfg.method)
    low, high = LR_RANGE[kind]
    assert low <= m.lr <= high, (kind, m.lr)
    assert 256 <= m.seq_len <= cfg.model.max_positions
    assert m.epochs >= 1 and m.micro_batch_size >= 1
    assert m.warmup_steps is not None or 0 <= m.warmup_ratio <= 0.1
    if kind not in ("ppo", "eval"):
        assert m.global_batch_size >= 16 and m.global_batch_size % (m.micro_batch_size * derived.data_parallel_size) == 0
    for key in ("lr", "epochs", "seq_len", "micro_batch_size"):
        assert key in m.recipe_sources and "recipe:" in m.recipe_sources[key]  # each value says where it came from


def test_headline_values_follow_the_model_size():
    assert _job("model=llama2_7b", "method=sft")[0].method.lr == 2e-5
    assert _job("model=llama2_13b", "method=sft")[0].method.lr == 1e-5
    assert _job("model=llama_7b", "method=lora")[0].method.lr == 2e-4
    assert _job("model=llama_65b", "method=lora")[0].method.lr == 1e-4
    dpo = _job("model=llama2_7b", "method=dpo")[0].method
    assert (dpo.lr, dpo.dpo.beta) == (1e-6, 0.1)
    assert _job("model=llama2_7b", "method=dpo", "method.adapter=lora")[0].method.lr == 5e-6
    chatglm = _job("model=chatglm_6b", "method=ptuning")[0].method
    assert (chatglm.lr, chatglm.ptuning.num_virtual_tokens) == (2e-2, 128)
    pretrain, _ = _job("model=llama_7b", "method=pretrain")
    assert pretrain.method.global_batch_size * pretrain.method.seq_len == 4 * 2**20  # LLaMA's 4M-token batch


def test_tiny_models_keep_the_demo_values_of_the_main_job():
    cfg, derived = _job("hw=cpu")
    m = cfg.method
    assert (m.lr, m.seq_len, m.micro_batch_size, m.epochs, m.warmup_steps) == (1e-3, 128, 2, 2, 2)
    assert derived.global_batch_size == 2 * derived.data_parallel_size
    ppo = _job("hw=cpu", "method=ppo")[0].method
    assert (ppo.lr, ppo.seq_len, ppo.ppo.critic_lr, ppo.ppo.max_new_tokens) == (1e-4, 64, 1e-3, 16)


def test_a_value_the_user_sets_wins_and_is_not_attributed_to_the_recipe():
    m = _job("model=llama2_7b", "method=sft", "method.lr=5e-5", "method.seq_len=512")[0].method
    assert (m.lr, m.seq_len) == (5e-5, 512)
    assert "lr" not in m.recipe_sources and "seq_len" not in m.recipe_sources


def test_recipe_global_batch_is_rounded_to_what_one_step_consumes():
    cfg, derived = _job("model=llama2_7b", "method=sft", "hw.nodes=3")  # 24 ranks: 128 is not a multiple
    assert cfg.method.global_batch_size == 120 and derived.grad_accum_steps == 5


def test_warmup_ratio_becomes_steps_of_the_run():
    m = _job("model=llama2_7b", "method=sft")[0].method
    assert warmup_steps(m, 1000) == 30
    assert warmup_steps(_job("hw=cpu")[0].method, 1000) == 2  # demo: explicit steps


def test_a_users_own_method_gets_the_recipe_of_what_it_is():
    method = OmegaConf.create({"stage": "lm", "adapter": "none", "data_kind": "sft"})
    assert method_kind(method) == "sft"
    assert method_kind(OmegaConf.merge(method, {"adapter": "lora"})) == "lora"
    assert method_kind(OmegaConf.merge(method, {"data_kind": "pretrain"})) == "pretrain"


def test_a_real_model_refuses_the_bundled_demo_data(tmp_path):
    cfg, _ = _job("model=llama2_7b")
    assert any(re.search(r"data.train=.*demo.*set data.train=YOUR_DATA.*allow_demo_data=true", refusal)
               for refusal in launch_refusals(cfg))
    assert launch_refusals(_job("model=llama2_7b", "data.allow_demo_data=true")[0]) == []
    assert launch_refusals(_job("model=llama2_7b", f"data.train={tmp_path}/mine.jsonl")[0]) == []
    proc = subprocess.run([sys.executable, "launch.py", "model=llama2_7b", "hw=cpu", "preflight=off",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "would train on the bundled demo data" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "data").exists()


def test_headline_dry_run_shows_the_recipe(tmp_path):
    proc = subprocess.run([sys.executable, "launch.py", "model=pangu_2.6b", "method=sft", "hw=a100x8", "dry_run=true",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "method.lr = 2e-05 (sft recipe: Stanford Alpaca" in proc.stdout
    assert "[dry run] would be refused: model=pangu_2.6b would train on the bundled demo data" in proc.stdout
    assert "lr: 2.0e-05" in (tmp_path / "config.yaml").read_text()
