"""The pipeline version of llama-shaped models, without starting DeepSpeed: its layers chained in one
process compute the Hugging Face model's loss; layer files and HF weights convert both ways exactly;
composition refuses what the pipeline cannot train, naming the key."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hpcllm.config import ConfigError, compose, derive
from hpcllm.launch.job import launch_refusals
from hpcllm.models.build import build_model
from hpcllm.models.pipeline import (causal_lm_loss, hf_to_layer_states, layer_specs, layer_state_from_hf,
                                    hf_prefixes, parts_boundaries, pp_to_hf_state, save_layer_files)

ROOT = Path(__file__).resolve().parents[2]


def _tiny(name: str, **extra):
    model = compose([f"model={name}"]).model
    return build_model(OmegaConf.merge(model, extra), seed=7)


def _chained_loss(hf_model, input_ids, attention_mask, labels):
    """Run the pipeline's layers one after another, as the stages would, with the HF model's weights."""
    config, state = hf_model.config, hf_model.state_dict()
    built = {}
    x = (input_ids, attention_mask)
    for spec, mapping in zip(layer_specs(config), hf_prefixes(config)):
        key = getattr(spec, "key", None) or len(built)
        if key in built:  # the tied head reuses the first stage's embedding
            x = spec.forward_fn(built[key], x)
            continue
        layer = spec.build()
        layer.load_state_dict(layer_state_from_hf(layer, mapping, state))
        built[key] = layer
        x = layer(x)
    return causal_lm_loss(x, labels)


@pytest.mark.parametrize("name,extra", [("tiny_llama", {}), ("tiny_qwen2", {}), ("tiny_mistral", {}),
                                        ("tiny_qwen2", {"tie_embeddings": True})])
def test_pipeline_layers_compute_the_hf_models_loss(name, extra):
    model = _tiny(name, **extra).eval()
    torch.manual_seed(0)
    input_ids = torch.randint(0, 4000, (2, 24))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 17:] = 0  # right padding, as dynamic padding makes it
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        got = _chained_loss(model, input_ids, attention_mask, labels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_to_pp_to_hf_is_the_identity(tmp_path, tied):
    model = _tiny("tiny_llama", tie_embeddings=tied)
    model.save_pretrained(tmp_path / "hf")
    tool = [sys.executable, str(ROOT / "tools/convert_checkpoint.py")]
    subprocess.run([*tool, "hf_to_pp", tmp_path / "hf", tmp_path / "pp"], check=True, capture_output=True)
    layers = sorted(p.name for p in (tmp_path / "pp").glob("layer_*"))
    # embedding, 4 decoder layers, then norm + head (untied) or the norm (tied: the head is layer 0's copy)
    assert len(layers) == 6
    assert (tmp_path / "pp/pipeline_manifest.json").is_file()
    subprocess.run([*tool, "pp_to_hf", tmp_path / "pp", tmp_path / "back"], check=True, capture_output=True)
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    original, restored = model.state_dict(), back.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key


def test_layer_files_keep_every_tensor_and_refuse_foreign_ones(tmp_path):
    model = _tiny("tiny_llama")
    state = model.state_dict()
    layers = hf_to_layer_states(state, model.config)
    assert sorted(layers) == list(range(6))  # embedding, 4 decoder layers, norm + head
    assert "layer.self_attn.q_proj.weight" in layers[1] and set(layers[5]) == {"norm.weight", "lm_head.weight"}
    save_layer_files(layers, model.config, tmp_path)
    assert pp_to_hf_state(tmp_path, model.config).keys() == state.keys()
    with pytest.raises(ValueError, match="no pipeline layer"):
        hf_to_layer_states({**state, "model.vision_tower.weight": torch.zeros(1)}, model.config)
    (tmp_path / "layer_03-model_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match="layer_03"):
        pp_to_hf_state(tmp_path, model.config)


def test_explicit_parts_become_stage_boundaries():
    assert parts_boundaries([5, 4, 4, 4, 4, 4, 4, 5], 34, 8, "k") == [0, 5, 9, 13, 17, 21, 25, 29, 34]
    with pytest.raises(ValueError, match="summing to the pipeline's 34 layers"):
        parts_boundaries([5, 4, 4, 4, 4, 4, 4, 4], 34, 8, "k")


def test_pipeline_jobs_are_validated_at_composition(tmp_path):
    base = ["model=llama2_7b", "hw=a100x8", "zero=stage1", "train.pipeline_parallel=8"]
    assert derive(compose(base)).data_parallel_size == 1
    derive(compose([*base, "train.pipeline_parts=[5,4,4,4,4,4,4,5]"]))  # llama-7b's 34 layers on 8 stages
    with pytest.raises(ConfigError, match=r"train.pipeline_parts=\[4, 4, 4, 4, 4, 4, 4, 4\].*34 pipeline layers"):
        derive(compose([*base, "train.pipeline_parts=[4,4,4,4,4,4,4,4]"]))
    with pytest.raises(ConfigError, match="train.pipeline_partition='blocks'"):
        derive(compose([*base, "train.pipeline_partition=blocks"]))
    with pytest.raises(ConfigError, match="method=lora cannot train with train.pipeline_parallel=8"):
        derive(compose([*base, "method=lora"]))
    with pytest.raises(ConfigError, match=r"model=bloom_7b1 \(bloom\) cannot train.*ALiBi"):
        derive(compose([*base, "model=bloom_7b1"]))
    with pytest.raises(ConfigError, match=r"model=mixtral_8x7b \(mixtral\).*router"):
        derive(compose([*base, "model=mixtral_8x7b"]))
    with pytest.raises(ConfigError, match="zero=stage3"):
        derive(compose([*base, "zero=stage3"]))
    # Accepted pipeline jobs now launch; tensor parallelism is still refused before anything runs.
    pipe = compose([*base, f"data.train={tmp_path}/sft.jsonl"])
    derive(pipe)
    assert launch_refusals(pipe) == []
    tp = compose(["model=llama2_7b", "hw=a100x8", f"data.train={tmp_path}/sft.jsonl", "train.tensor_parallel=2"])
    derive(tp)
    assert any("train.tensor_parallel=2: the training loop has no tensor parallelism" in r for r in launch_refusals(tp))


@pytest.mark.parametrize("partition", ["parameters", "uniform", "type:DecoderPipe"])
def test_per_stage_estimate_matches_the_built_pipelines_layers(partition):
    """The pre-flight's per-layer parameter counts are those of the built layers, and its stage split is
    DeepSpeed's over those counts."""
    from deepspeed.runtime import utils as ds_utils

    from hpcllm.plan.formulas import arch_of
    from hpcllm.plan.pipeline import layer_param_counts, stage_bounds, stage_figures

    cfg = compose(["zero=stage1", "train.pipeline_parallel=2", f"train.pipeline_partition={partition}",
                   "method.micro_batch_size=2", "method.global_batch_size=4"])  # 2 micro batches per step
    derived = derive(cfg)
    model = _tiny("tiny_llama")
    built = [sum(p.numel() for p in spec.build().parameters()) for spec in layer_specs(model.config)]
    assert layer_param_counts(arch_of(cfg.model)) == built
    if partition == "parameters":
        assert stage_bounds(cfg.train, arch_of(cfg.model)) == ds_utils.partition_balanced(built, 2)
    figures = stage_figures(cfg, derived)
    bounds = stage_bounds(cfg.train, arch_of(cfg.model))
    assert [f.params for f in figures] == [sum(built[bounds[s]:bounds[s + 1]]) for s in range(2)]
    assert sum(f.params for f in figures) == sum(p.numel() for p in model.parameters())
    assert figures[0].in_flight == 2 and figures[1].in_flight == 1  # 1F1B: the first stage holds the most


def test_pipeline_stages_hold_a_fraction_of_a_7b_models_states():
    from hpcllm.plan.formulas import arch_of, count_params
    from hpcllm.plan.pipeline import bubble_fraction, stage_figures

    cfg = compose(["model=llama2_7b", "hw=a100x8", "zero=stage1", "train.gradient_checkpointing=true",
                   "train.pipeline_parallel=8", "train.pipeline_parts=[5,4,4,4,4,4,4,5]"])
    eight = stage_figures(cfg, derive(cfg))
    assert [f.layers for f in eight][:2] == [(0, 5), (5, 9)]
    assert sum(f.params for f in eight) == count_params(arch_of(cfg.model))
    # bf16 + ZeRO-1 over 1 replica: 2 (weights) + 2 (grads) + 16 (fp32 grads, master, Adam) bytes/param
    # = 18.8 GB on the first stage (embedding + 4 layers), against 135 GB for the whole model on one GPU.
    assert eight[0].states_bytes == pytest.approx(20 * eight[0].params, rel=0.01)
    assert eight[0].in_flight == 8 and eight[-1].in_flight == 1
    assert max(f.total_bytes for f in eight) < 20 * count_params(arch_of(cfg.model)) / 6
    assert bubble_fraction(8, 8) == pytest.approx(7 / 15)
