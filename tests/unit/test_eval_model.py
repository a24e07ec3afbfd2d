"""The evaluated model: a LoRA adapter directory is found by its adapter_config.json and loaded over its base."""
import json

import pytest
import torch

from hpcllm.config import compose, derive
from hpcllm.data import load_tokenizer
from hpcllm.distributed import DistEnv
from hpcllm.models.build import build_model
from hpcllm.stages.base import StageContext
from hpcllm.stages.eval import load_eval_model


@pytest.mark.parametrize("base_on_disk", [False, True])
def test_lora_adapter_is_loaded_over_its_base(tmp_path, base_on_disk):
    from peft import LoraConfig, get_peft_model

    tok = load_tokenizer("demo")
    cfg = compose(["method=eval", "data.train=null"])
    base = build_model(cfg.model, seed=cfg.seed, tokenizer=tok)
    if base_on_disk:  # an exported run's final/: the adapter names it
        base.save_pretrained(tmp_path / "base")
        base.name_or_path = str(tmp_path / "base")
    else:  # a LoRA run over the preset's random weights: the adapter names no base
        base.name_or_path = ""
    tuned = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    tuned.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    named = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == (str(tmp_path / "base") if base_on_disk else None) or (not base_on_disk and not named)

    cfg = compose(["method=eval", "data.train=null", f"model.path={tmp_path / 'adapter'}"])
    ctx = StageContext(cfg, derive(cfg), tmp_path, DistEnv(0, 0, 1, "127.0.0.1", 0), {}, tok)
    loaded = load_eval_model(ctx)
    ids = torch.tensor([tok.encode("以下是中国关于计算机网络考试的单项选择题")])
    with torch.no_grad():
        expected = tuned.eval()(input_ids=ids).logits
        with tuned.disable_adapter():
            base_logits = tuned(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert type(loaded).__name__.startswith("PeftModel")
    assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(got, base_logits, atol=1e-3)


def test_partitioned_eval_gives_every_rank_as_many_batches(tmp_path):
    """Under ZeRO-3 forwards are collective: the rank with fewer batches runs fillers (flagged, discarded)."""
    from types import SimpleNamespace

    from hpcllm.stages.eval import rank_share

    def ctx(rank):
        return SimpleNamespace(dist=SimpleNamespace(rank=rank, world_size=2), run_dir=tmp_path)
    assert rank_share(list("abcde"), ctx(1)) == [("b", False), ("d", False)]  # replicas: no fillers
    (tmp_path / "ds_config_eval.json").write_text("{}")
    assert rank_share(list("abcde"), ctx(0)) == [("a", False), ("c", False), ("e", False)]
    assert rank_share(list("abcde"), ctx(1)) == [("b", False), ("d", False), ("a", True)]
    assert rank_share([], ctx(1)) == []
