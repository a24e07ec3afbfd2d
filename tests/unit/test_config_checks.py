"""Checked at composition, so a dry run catches it: every value that used to crash the workers, pass
silently or fail after the model loaded is refused by compose + derive, naming the key and the fix."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from hpcllm.config import ConfigError, compose, derive
from hpcllm.config.schema import Choice

ROOT = Path(__file__).resolve().parents[2]


def refusal(overrides) -> str:
    """The message a user sees for these overrides (composition or derive), or fail if they are accepted."""
    try:
        derive(compose(overrides))
    except ConfigError as err:
        return str(err)
    except ConfigCompositionException as err:
        return f"{err}\n{err.__cause__}"
    pytest.fail(f"accepted: {overrides}")


# (overrides, what the message must say: the key with its value, and the fix or the valid range)
REFUSED = [
    (["train.log_every=0"], r"train.log_every=0 must be at least 1"),
    (["model.num_kv_heads=0"], r"model.num_kv_heads=0 must be at least 1"),
    (["train.save_every=-2"], r"train.save_every=-2 must be at least 0 \(0 = save only at the end"),
    (["train.keep_last=-1"], r"train.keep_last=-1 must be at least 0"),
    (["train.max_steps=0"], r"train.max_steps=0 trains nothing: give a positive number of steps, or -1"),
    (["train.max_steps=-5"], r"train.max_steps=-5 trains nothing"),
    (["method.warmup_steps=-1"], r"method.warmup_steps=-1 must be at least 0"),
    (["method.grad_clip=-1"], r"method.grad_clip=-1.0 must be at least 0 \(0 = no clipping\)"),
    (["method.weight_decay=-0.1"], r"method.weight_decay=-0.1 must be at least 0"),
    (["train.min_free_disk_gb=-1"], r"train.min_free_disk_gb=-1.0 must be at least 0"),
    (["hw.nodes=100000000"], r"hw.nodes=100000000 must be between 1 and 16384"),
    (["hw.nodes=1e8"], r"Value '100000000.0' of type 'float' could not be converted to Integer[\s\S]*hw.nodes"),
    (["hw.gpus_per_node=0"], r"hw.gpus_per_node=0 must be between 1 and"),
    (["cluster.time_limit_min=0"], r"cluster.time_limit_min=0 must be at least 1 minute \(Slurm reads --time=0"),
    (["cluster.mem_gb=0"], r"cluster.mem_gb=0 would render --mem=0.*leave cluster.mem_gb=null"),
    (["cluster.mem_gb=-4"], r"cluster.mem_gb=-4.0 must be at least 1"),
    (["cluster.time_limit_min=30", "cluster.signal_before_min=30"],
     r"cluster.signal_before_min=30 must be at least 1 and below cluster.time_limit_min=30"),
    (["cluster.signal_before_min=0"], r"cluster.signal_before_min=0 must be at least 1"),
    (["cluster.port_base=50000"], r"cluster.port_base=50000 must be between 1024 and 45535"),
    (["cluster.port_base=80"], r"cluster.port_base=80 must be between 1024"),
    (["data.mode=bogus"], r"Invalid value 'bogus', expected one of \[pack, truncate, split\][\s\S]*data.mode"),
    (["data.pretrain_ratio=2"], r"data.pretrain_ratio=2.0 must be in \[0, 1\)"),
    (["data.pretrain_ratio=0.25"], r"data.pretrain_ratio=0.25 needs data.pretrain .*set data.pretrain=PATH"),
    (["method=dpo", "data.pretrain_ratio=0.25", "data.pretrain=x.jsonl"],
     r"data.pretrain_ratio=0.25 mixes pretraining text into pretrain/SFT stages only.*set data.pretrain_ratio=0"),
    (["method.lr=nan"], r"method.lr=nan must be a positive number"),
    (["method.lr=-1e-4"], r"method.lr=-0.0001 must be a positive number"),
    (["method.lr=0"], r"method.lr=0.0 must be a positive number"),
    (["train.attention=bogus"], r"expected one of \[sdpa, eager, flash_attention_2\][\s\S]*train.attention"),
    (["data.eval_fraction=1.5"], r"data.eval_fraction=1.5 must be in \[0, 1\)"),
    (["data.train=null"], r"data.train is not set: method=sft needs sft data"),
    (["method.dpo.loss=sigmod"], r"expected one of \[sigmoid, ipo, hinge\][\s\S]*method.dpo.loss"),
    (["method.schedule=cosin"], r"expected one of \[cosine, linear, constant\][\s\S]*method.schedule"),
    (["method.adapter=qlora"], r"expected one of \[none, lora, freeze, ptuning\][\s\S]*method.adapter"),
    (["train.precision=fp8"], r"expected one of \[auto, fp32, fp16, bf16\][\s\S]*train.precision"),
    (["preflight=maybe"], r"expected one of \[refuse, warn, off\][\s\S]*preflight"),
    (["eval.benchmark=cmmlu"], r"expected one of \[ceval, mmlu, afqmc, [\s\S]*perplexity\][\s\S]*eval.benchmark"),
    (["wandb.mode=cloud"], r"expected one of \[offline, online\][\s\S]*wandb.mode"),
    (["model.position=nope"], r"expected one of \[rope, alibi, learned\][\s\S]*model.position"),
    (["method.stage=sft"], r"method.stage='sft' is not one of lm, reward, dpo, ppo, eval"),
    # PPO sizes, ptx_coef and the eval settings: were checked only in the workers, after the models loaded.
    (["method=ppo", "method.ppo.rollout_batch_size=6"],
     r"method.ppo.rollout_batch_size=6 is not divisible by method.micro_batch_size=4 x data-parallel size 2: "
     r"set it to a multiple of 8"),
    (["method=ppo", "method.micro_batch_size=1", "method.global_batch_size=8", "method.ppo.rollout_batch_size=2",
      "method.ppo.ppo_epochs=1"], r"not a whole number of optimizer steps of 4 micro batches"),
    (["method=ppo", "method.ppo.ppo_epochs=0"], r"method.ppo.ppo_epochs=0 must be at least 1"),
    (["method=ppo", "method.ppo.ptx_coef=0.5"], r"method.ppo.ptx_coef=0.5 needs data.pretrain.*set data.pretrain=PATH"),
    (["method=ppo", "method.ppo.critic_lr=nan"], r"method.ppo.critic_lr=nan must be a positive number"),
    (["method=ppo", "method.ppo.temperature=0"], r"method.ppo.temperature=0.0 must be positive"),
    (["method=eval", "eval.batch_size=0"], r"eval.batch_size=0 must be at least 1"),
    (["method=eval", "eval.shots=-1"], r"eval.shots=-1 must be at least 0 \(0 = zero-shot\)"),
    (["method=eval", "eval.benchmark=perplexity", "data.train=null"],
     r"eval.benchmark=perplexity needs data.eval or data.train"),
]


@pytest.mark.parametrize("overrides,message", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_refused_at_composition_naming_the_key_and_the_fix(overrides, message):
    text = refusal(overrides)
    assert re.search(message, text), text


def test_the_defaults_and_the_edges_of_each_range_are_accepted():
    for overrides in ([], ["train.max_steps=-1"], ["train.save_every=0", "train.keep_last=0"], ["method.grad_clip=0"],
                      ["hw.nodes=16384", "hw=a100x8"], ["cluster.port_base=45535"], ["cluster.mem_gb=null"],
                      ["cluster.time_limit_min=2", "cluster.signal_before_min=1"], ["data.pretrain_ratio=0"],
                      ["method=eval", "method.lr=0"],  # nothing trains: the lr is not read
                      ["method=ppo", "method.micro_batch_size=2", "method.ppo.rollout_batch_size=12"]):
        derive(compose(overrides))


def test_options_stay_plain_strings_in_code_and_in_config_yaml(tmp_path):
    """Enum values compare, format and serialize as the strings the YAML presets and config.yaml use."""
    from omegaconf import OmegaConf

    from hpcllm.launch.job import load_config, prepare

    cfg = compose(["method=dpo", "method.dpo.loss=ipo", "train.attention=eager"])
    loss = cfg.method.dpo.loss
    assert isinstance(loss, Choice) and loss == "ipo" and f"{loss}" == "ipo" and str(loss) == "ipo"
    assert {"ipo": 1}[loss] == 1 and json.dumps(loss) == '"ipo"'
    prepare(cfg, tmp_path)
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.method.dpo.loss == "ipo" and type(saved.method.dpo.loss) is str
    assert "loss: ipo" in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path).train.attention == "eager"  # the worker's view, checked by the schema again


USER_METHOD = """\
# A user's own method preset: any name; its stage says what runs.
defaults:
  - base_method
  - _self_

name: my_sft
stage: lm
data_kind: sft
adapter: lora
lr: 2.0e-4
seq_len: 128
micro_batch_size: 2
"""


def user_conf(tmp_path, text=USER_METHOD, name="my_sft") -> str:
    (tmp_path / "method").mkdir(exist_ok=True)
    (tmp_path / "method" / f"{name}.yaml").write_text(text)
    return f"hydra.searchpath=[file://{tmp_path}]"


def test_a_users_own_method_preset_is_not_refused_by_a_list_of_names(tmp_path):
    cfg = compose([user_conf(tmp_path), "method=my_sft"])
    derived = derive(cfg)
    assert (cfg.method.name, cfg.method.stage, cfg.method.adapter, cfg.method.lr) == ("my_sft", "lm", "lora", 2e-4)
    assert derived.world_size == 2
    with pytest.raises(ConfigCompositionException) as err:  # its values are still checked against the schema
        compose([user_conf(tmp_path, USER_METHOD.replace("adapter: lora", "adapter: lora2"), "bad"), "method=bad"])
    assert re.search(r"Invalid value 'lora2'[\s\S]*full_key: method.adapter", f"{err.value}{err.value.__cause__}")
    with pytest.raises(ConfigError, match=r"method.data_kind=sft does not fit method.stage=dpo \(method=my_sft\), "
                                          r"which trains on preference data: set method.data_kind=preference"):
        derive(compose([user_conf(tmp_path), "method=my_sft", "method.stage=dpo"]))
    with pytest.raises(ConfigError, match="method.stage='sft2' is not one of lm, reward, dpo, ppo, eval"):
        derive(compose([user_conf(tmp_path, USER_METHOD.replace("stage: lm", "stage: sft2"), "odd"), "method=odd"]))


def test_a_users_method_preset_dry_runs_through_launch_py(tmp_path):
    (tmp_path / "conf").mkdir()
    search = user_conf(tmp_path / "conf")
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), search, "method=my_sft", "dry_run=true",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "tiny_llama / my_sft / cpu" in out.stdout
    assert "name: my_sft" in (tmp_path / "run" / "config.yaml").read_text()


# -- model.path and model.tokenizer: a wrong location fails before anything is prepared or queued ---------


def test_a_model_path_that_does_not_exist_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=rf"model.path={tmp_path}/nowhere does not exist: give a local Hugging "
                                          r"Face directory \(with config.json\) or a hub id"):
        derive(compose([f"model.path={tmp_path}/nowhere"]))
    with pytest.raises(ConfigError, match="model.path=./models/llama does not exist"):
        derive(compose(["model.path=./models/llama"]))


def test_a_model_path_that_holds_no_model_names_the_key(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError, match=rf"model.path={tmp_path} holds no model \(no config.json or "
                                          r"adapter_config.json\)"):
        derive(compose([f"model.path={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"model.path=.*notes.txt is a file"):
        derive(compose([f"model.path={tmp_path / 'notes.txt'}"]))
    with pytest.raises(ConfigError, match=r"model.tokenizer=.* holds no tokenizer"):
        derive(compose([f"model.tokenizer={tmp_path}"]))


def test_model_locations_that_are_accepted(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    derive(compose([f"model.path={tmp_path / 'model'}"]))
    derive(compose(["model.path=meta-llama/Llama-2-7b-hf", "model.tokenizer=gpt2"]))  # hub ids: not looked up
    # An earlier pipeline stage's export: its run directory is prepared, its final/ not written yet.
    (tmp_path / "sft").mkdir()
    for name in ("config.yaml", "job.sbatch"):
        (tmp_path / "sft" / name).write_text("")
    derive(compose([f"model.path={tmp_path / 'sft' / 'final'}"]))
    with pytest.raises(ConfigError, match="does not exist"):  # but not a typo inside that run directory
        derive(compose([f"model.path={tmp_path / 'sft' / 'finl'}"]))
