"""Packing without cross-contamination (issue 16 §7): a packed row's loss, computed by a real tiny
Hugging Face llama from the batch the training loop gets, equals the token-weighted mean of its
samples' losses computed one by one."""
import json

import numpy as np
import pytest
import torch

from hpcllm.data import MemmapDataset, iter_batches, lm_inputs, load_tokenizer, prepare_memmap
from hpcllm.data.encode import IGNORE

RECORDS = [
    {"instruction": "Name a colour.", "output": "Blue, like the sky on a clear day."},
    {"instruction": "What is 2+2?", "output": "4"},
    {"type": "conversation", "rounds": [["ask", "Hi"], ["ans", "Hello! How can I help?"], ["ask", "Tell a joke"],
                                        ["ans", "Why did the chicken cross the road?"]]},
    {"prompt": "Translate 'cat' to French", "response": "chat"},
]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packing")
    with open(tmp / "sft.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in RECORDS)
    meta = prepare_memmap(str(tmp / "sft.jsonl"), str(tmp / "out"), "demo", 256, mode="pack", model_preset="tiny_qwen2",
                          kind="sft", progress=False)
    return MemmapDataset(str(tmp / "out")), meta


def tiny_llama(vocab_size, attention):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM._from_config(config, attn_implementation=attention).to(torch.float64).eval()


def test_a_packed_row_holds_every_sample_with_positions_restarting(packed):
    ds, meta = packed
    row = ds[0]
    assert len(ds) == 1 and meta["files"]["position_ids"]["shape"] == [1, 256]
    starts = np.flatnonzero(row["position_ids"] == 0)
    real = int(row["attention_mask"].sum())
    assert len(starts) == len(RECORDS) + 1 and starts[-1] == real  # one per sample, then the padding's
    assert (row["labels"][starts] == IGNORE).all()  # no sample's first token is predicted from the one before


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_the_token_weighted_mean_of_the_samples_losses(packed, attention):
    ds, _ = packed
    tok = load_tokenizer("demo")
    model = tiny_llama(len(tok), attention)
    batch = next(iter_batches(ds, 1, 0, 1, pad_token_id=tok.pad_token_id))
    packed_loss = model(**lm_inputs(batch)).loss

    ids, labels, positions = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    starts = torch.nonzero(positions == 0).flatten().tolist() + [len(ids)]
    losses, counts = [], []
    for a, b in zip(starts[:-1], starts[1:]):
        n = int((labels[a + 1:b] != IGNORE).sum())  # targets after the model's shift
        if n:
            losses.append(model(input_ids=ids[None, a:b], labels=labels[None, a:b]).loss * n)
            counts.append(n)
    assert len(counts) == len(RECORDS)
    expected = torch.stack(losses).sum() / sum(counts)
    torch.testing.assert_close(packed_loss, expected, rtol=1e-6, atol=1e-6)  # HF takes the loss in float32
    # attending across samples, as packed rows did before, gives another loss
    crossing = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert abs(float(crossing - expected)) > 1e-4
