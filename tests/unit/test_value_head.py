"""Reward models: last-token reads, LoRA merged on export, and a save/load round trip."""
import torch
from omegaconf import OmegaConf

from hpcllm.config import compose
from hpcllm.data import load_tokenizer
from hpcllm.models.adapters import apply_lora
from hpcllm.models.build import build_model
from hpcllm.models.value_head import (RewardModel, last_token_index, load_reward_model, plain_state_dict,
                                      save_reward_model)


def tiny_backbone():
    cfg = compose(["model=tiny_llama"])
    return build_model(cfg.model, tokenizer=load_tokenizer("demo", None)), cfg


def test_last_token_index_on_right_left_and_both_sides_padded():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 0]])
    assert last_token_index(mask).tolist() == [1, 3, 2]


def test_lora_is_merged_into_the_exported_weights():
    backbone, cfg = tiny_backbone()
    method = OmegaConf.merge(cfg.method, {"lora": {"r": 4, "alpha": 8}})
    peft_model = apply_lora(backbone, method, cfg.model)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # peft starts B at zero: make the merge visible
    plain = plain_state_dict(peft_model.state_dict(), lora_scaling=8 / 4)
    merged = peft_model.merge_and_unload().state_dict()
    assert plain.keys() == merged.keys()
    for key in merged:
        torch.testing.assert_close(plain[key], merged[key])


def test_save_and_load_round_trip_scores_the_same(tmp_path):
    backbone, _ = tiny_backbone()
    model = RewardModel(backbone).eval()
    save_reward_model(model, model.state_dict(), tmp_path)
    loaded = load_reward_model(tmp_path)
    ids = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), model(ids, mask))
        # the score is the value at the last real token
        torch.testing.assert_close(model(ids, mask), model.values(ids, mask)[[0, 1], [2, 1]])


def test_building_under_swaps_the_zero3_setting_and_restores_the_jobs():
    """PPO builds each model under its own profile: transformers' process-wide DeepSpeed setting is swapped
    for the build and the job's comes back afterwards, whichever it was."""
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    from hpcllm.models.build import building_under

    zero3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    job = HfDeepSpeedConfig(zero3)  # a ZeRO-3 job with zero.Init
    with building_under(None):
        assert not is_deepspeed_zero3_enabled()
    assert is_deepspeed_zero3_enabled()
    del job
    assert not is_deepspeed_zero3_enabled()
    with building_under(zero3):
        assert is_deepspeed_zero3_enabled()
    assert not is_deepspeed_zero3_enabled()
