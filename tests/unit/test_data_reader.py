"""The reader: checks against the job, per-rank sharding, exact resume, dynamic padding."""
import json
import os

import numpy as np
import pytest
import torch

from hpcllm.data import MemmapDataset, iter_batches, load_tokenizer, prepare_memmap, tokenizer_hash

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "data", "demo")
N = 37  # rows: not a multiple of any batch below, so epochs wrap mid-step


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """Row i of the prepared data holds the text "row <k>" (k known from the first token ids)."""
    d = tmp_path_factory.mktemp("reader")
    with open(d / "n.jsonl", "w") as f:
        for i in range(N):
            f.write(json.dumps({"text": "x " * (i % 5) + f"row {i}"}) + "\n")
    prepare_memmap(str(d / "n.jsonl"), str(d / "out"), "demo", 16, "truncate", None, progress=False)
    return str(d / "out")


def row_ids(ds):
    return [ds[i]["input_ids"].tobytes() for i in range(len(ds))]


def batch_rows(batch, ds_full):
    """Which dataset rows a (not dynamically padded) batch holds."""
    return [ds_full.index(r.astype(np.uint16).tobytes()) for r in batch["input_ids"].numpy()]


def test_dataset_basics(numbered):
    ds = MemmapDataset(numbered)
    assert len(ds) == N and ds.kind == "pretrain" and ds.seq_len == 16
    row = ds[3]
    assert set(row) == {"input_ids", "attention_mask", "labels"} and row["input_ids"].shape == (16,)
    assert not ds.arrays["input_ids"].flags.writeable
    assert len(set(row_ids(ds))) == N


@pytest.mark.parametrize("micro, world", [(2, 1), (2, 3), (4, 2), (1, 5)])
def test_ranks_cover_every_row_exactly_once_per_epoch(numbered, micro, world):
    ds = MemmapDataset(numbered)
    full = row_ids(ds)
    steps = N  # N steps of micro*world rows = micro*world whole epochs
    seen = []
    for rank in range(world):
        it = iter_batches(ds, micro, rank, world, dynamic_padding=False, pad_token_id=2)
        seen.append([batch_rows(next(it), full) for _ in range(steps)])
    global_order = [r for k in range(steps) for rank in range(world) for r in seen[rank][k]]
    assert global_order == [i % N for i in range(steps * micro * world)]  # the defined order, wrapping
    assert sorted(global_order) == sorted(list(range(N)) * micro * world)


def test_resume_at_a_sample_offset_continues_exactly(numbered):
    ds = MemmapDataset(numbered)
    micro, world, done_steps = 3, 2, 7
    for rank in range(world):
        it = iter_batches(ds, micro, rank, world)
        for _ in range(done_steps):
            next(it)
        resumed = iter_batches(ds, micro, rank, world, consumed_samples=done_steps * micro * world)
        for _ in range(10):
            a, b = next(it), next(resumed)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batches_are_long_tensors_trimmed_to_the_longest_row(numbered):
    ds = MemmapDataset(numbered)
    batch = next(iter_batches(ds, 4, 0, 1, dynamic_padding=True, pad_token_id=2))
    assert all(v.dtype == torch.long for v in batch.values())
    longest = max(int(ds[i]["attention_mask"].sum()) for i in range(4))
    assert batch["input_ids"].shape == (4, longest) and batch["attention_mask"][:, -1].any()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 2).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_preference_sides_trim_separately_and_prompts_trim_on_the_left(tmp_path):
    prepare_memmap(os.path.join(DEMO, "preference.jsonl"), str(tmp_path / "pref"), "demo", 128, "truncate", "tiny_qwen2", progress=False)
    batch = next(iter_batches(MemmapDataset(str(tmp_path / "pref")), 8, 0, 1))
    assert {k.split("_", 1)[0] for k in batch} == {"chosen", "rejected"}
    for side in ("chosen", "rejected"):
        mask = batch[f"{side}_attention_mask"]
        assert mask[:, -1].any() and all(batch[f"{side}_{k}"].shape == mask.shape for k in ("input_ids", "labels"))
    prepare_memmap(os.path.join(DEMO, "prompt.jsonl"), str(tmp_path / "prompt"), "demo", 128, "pack", "tiny_qwen2", progress=False)
    batch = next(iter_batches(MemmapDataset(str(tmp_path / "prompt")), 8, 0, 1))
    assert batch["attention_mask"][:, 0].any() and batch["attention_mask"][:, -1].all()
    assert batch["input_ids"].shape[1] < 128


def test_mismatches_with_the_job_are_clear_errors(numbered):
    tok = load_tokenizer("demo")
    MemmapDataset(numbered, expect_seq_len=16, expect_tokenizer_hash=tokenizer_hash(tok))
    with pytest.raises(ValueError, match="seq_len=16 but the job uses seq_len=32"):
        MemmapDataset(numbered, expect_seq_len=32)
    with pytest.raises(ValueError, match="tokenized with 'demo'"):
        MemmapDataset(numbered, expect_tokenizer_hash="0123456789abcdef")
    with pytest.raises(ValueError, match="fewer than one step needs"):
        next(iter_batches(MemmapDataset(numbered), 8, 0, 5))


def test_tokenizer_hash_is_stable_and_tells_tokenizers_apart():
    a, b = load_tokenizer("demo"), load_tokenizer("demo")
    assert tokenizer_hash(a) == tokenizer_hash(b)
    b.add_tokens(["新词"])
    assert tokenizer_hash(a) != tokenizer_hash(b)
