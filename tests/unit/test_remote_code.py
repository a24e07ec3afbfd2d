"""Code shipped with a tokenizer or a model (``auto_map``) runs only when the model preset (or an explicit
override) trusts it: memmap_gen, the job's data preparation, training/eval/export (load_tokenizer and
build_model), PPO's reward model and merge_lora all follow ``model.trust_remote_code``.

The "remote" code here is a real Python file in a real tokenizer/model directory that writes a marker
file when it is imported: the marker says whether it ran."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpcllm.config import ConfigError, compose, derive
from hpcllm.data import DEMO_TOKENIZER_DIR, load_tokenizer, prepare_memmap

ROOT = Path(__file__).resolve().parents[2]
EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("ran")
{body}
"""


@pytest.fixture(autouse=True)
def modules_cache(tmp_path, monkeypatch):
    """transformers copies trusted code into its modules cache: keep that inside the test's directory."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "REMOTE_CODE_RAN"


@pytest.fixture
def code_tokenizer(tmp_path, marker):
    """The demo tokenizer, plus an auto_map naming a tokenizer class in a Python file of its own."""
    path = tmp_path / "code_tokenizer"
    shutil.copytree(DEMO_TOKENIZER_DIR, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="CodeTokenizer", auto_map={"AutoTokenizer": [None, "code_tok.CodeTokenizer"]})
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "code_tok.py").write_text(EVIL.format(marker=str(marker), body=(
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class CodeTokenizer(PreTrainedTokenizerFast):\n    pass\n")))
    return path


@pytest.fixture
def code_model(tmp_path, marker):
    path = tmp_path / "code_model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "code_model", "architectures": ["CodeModel"],
        "auto_map": {"AutoConfig": "code_model.CodeConfig", "AutoModelForCausalLM": "code_model.CodeModel"}}))
    (path / "code_model.py").write_text(EVIL.format(marker=str(marker), body=(
        "from transformers import PretrainedConfig\n\n\n"
        "class CodeConfig(PretrainedConfig):\n    model_type = 'code_model'\n")))
    return path


def test_a_tokenizer_with_its_own_code_is_refused_unless_trusted(code_tokenizer, marker):
    with pytest.raises(ValueError, match=r"ships Python code of its own \(auto_map\).*set model.trust_remote_code=true"):
        load_tokenizer(str(code_tokenizer))
    assert not marker.exists()
    assert len(load_tokenizer(str(code_tokenizer), trust_remote_code=True)) > 0
    assert marker.exists()  # trusted, the same directory runs its code: the check above can fail


def test_memmap_gen_follows_the_model_presets_trust(tmp_path, code_tokenizer, marker, capsys):
    from tools.memmap_gen import main

    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"instruction": "Say hello.", "output": "Hello."}) + "\n")
    args = [f"input={data}", f"output={tmp_path / 'out'}", "seq_len=128", f"tokenizer={code_tokenizer}",
            "progress=false"]
    assert main([*args, "model=tiny_llama"]) == 1  # tiny_llama: trust_remote_code=false
    err = capsys.readouterr().err
    assert "auto_map" in err and "trust_remote_code=true" in err
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert main([*args, "model=tiny_llama", "trust_remote_code=true"]) == 0  # an explicit override
    assert marker.exists() and (tmp_path / "out" / "meta.json").is_file()


def test_a_remote_code_family_preset_trusts_its_tokenizer(tmp_path, code_tokenizer, marker):
    assert compose(["model=chatglm2_6b"]).model.trust_remote_code
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "some pretraining text"}) + "\n")
    prepare_memmap(str(data), str(tmp_path / "out"), str(code_tokenizer), 32, model_preset="chatglm2_6b",
                   kind="pretrain", progress=False)
    assert marker.exists()


def test_the_jobs_data_preparation_follows_model_trust_remote_code(tmp_path, code_tokenizer, marker):
    from hpcllm.launch.datasets import ensure_memmaps

    cfg = compose(["model=tiny_llama", f"model.tokenizer={code_tokenizer}"], run_dir=tmp_path / "run")
    derive(cfg)  # as prepare() does: the recipe fills method.seq_len
    with pytest.raises(ValueError, match="model.trust_remote_code=true"):
        ensure_memmaps(cfg, tmp_path / "run")
    assert not marker.exists()


def test_a_model_with_its_own_code_is_refused_unless_trusted(code_model, marker):
    from hpcllm.models.build import build_model

    model = compose(["model=tiny_llama", f"model.path={code_model}"]).model
    with pytest.raises(ConfigError, match=rf"model.path={code_model} ships Python code of its own.*"
                                          r"set model.trust_remote_code=true"):
        build_model(model)
    assert not marker.exists()
    model.trust_remote_code = True
    with pytest.raises(Exception):  # the stand-in code defines no model class: only its import matters here
        build_model(model)
    assert marker.exists()


def test_ppos_reward_model_follows_the_trust_of_the_job(code_model, marker):
    from hpcllm.models.value_head import VALUE_HEAD_FILE, load_reward_model

    (code_model / VALUE_HEAD_FILE).write_bytes(b"")
    with pytest.raises(ConfigError, match="method.ppo.reward_model=.*set model.trust_remote_code=true"):
        load_reward_model(code_model)
    assert not marker.exists()


def test_merge_lora_follows_the_run_or_an_explicit_flag(tmp_path, code_tokenizer, marker, capsys):
    from tools.merge_lora import main

    (code_tokenizer / "adapter_config.json").write_text("{}")
    assert main([str(code_tokenizer), str(tmp_path / "merged")]) == 1
    assert "--trust-remote-code" in capsys.readouterr().err and not marker.exists()
    (tmp_path / "config.yaml").write_text("model:\n  trust_remote_code: true\n")  # the run that wrote final/
    from tools.merge_lora import run_trusts_remote_code

    assert run_trusts_remote_code(str(code_tokenizer)) and not run_trusts_remote_code(str(tmp_path / "x" / "y"))


def test_launch_stops_before_running_a_tokenizers_code(tmp_path, code_tokenizer, marker):
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), f"model.tokenizer={code_tokenizer}",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "ships Python code of its own (auto_map)" in out.stderr and "model.trust_remote_code=true" in out.stderr
    assert not marker.exists() and not (tmp_path / "run" / "logs").exists()
