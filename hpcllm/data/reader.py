"""The reader every training stage uses: read-only memmaps, checked against the job, sharded per rank."""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Dict, Iterator, Optional

import numpy as np

from hpcllm.data.memmap import FORMAT_VERSION

if TYPE_CHECKING:
    import torch


def read_meta(path: str) -> Optional[dict]:
    """meta.json of a prepared directory, or None when ``path`` is not one."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check_prepared(path: str, key: str, seq_len: int, tokenizer_spec: Optional[str], load=None) -> None:
    """A prepared directory against the job, without reading its rows: the seq_len it was cut to,
    and the tokenizer (by name, then, when the names differ, by fingerprint, loading the job's one
    with ``load``). The message names the override that fixes it."""
    meta = read_meta(path)
    if meta is None:
        return
    if meta.get("seq_len") != seq_len:
        raise ValueError(f"{key}={path} was prepared with seq_len={meta.get('seq_len')} but method.seq_len={seq_len}: "
                         f"set method.seq_len={meta.get('seq_len')}, or prepare the data again with seq_len={seq_len}")
    tok = meta.get("tokenizer") or {}
    if tokenizer_spec is None or tok.get("name") == tokenizer_spec or load is None:
        return
    from hpcllm.data.tokenizer import tokenizer_hash

    if tokenizer_hash(load(tokenizer_spec)) != tok.get("hash"):
        raise ValueError(f"{key}={path} was tokenized with {tok.get('name')!r} (hash {tok.get('hash')}) but the job's "
                         f"tokenizer is {tokenizer_spec!r}: set model.tokenizer={tok.get('name')}, or prepare the data "
                         "again with the job's tokenizer")


class MemmapDataset:
    """Rows of a directory written by ``prepare_memmap``; ``ds[i]`` is a dict of numpy rows."""

    def __init__(self, path: str, expect_seq_len: Optional[int] = None, expect_tokenizer_hash: Optional[str] = None):
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{path} is not a finished memmap directory (no meta.json): "
                                    "prepare it with tools/memmap_gen.py")
        with open(meta_path) as f:
            self.meta = json.load(f)
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: memmap format {self.meta.get('format_version')}, this code reads "
                             f"{FORMAT_VERSION}: prepare the data again with tools/memmap_gen.py")
        if expect_seq_len is not None and self.meta["seq_len"] != expect_seq_len:
            raise ValueError(f"{path} was prepared with seq_len={self.meta['seq_len']} but the job uses "
                             f"seq_len={expect_seq_len}: set method.seq_len={self.meta['seq_len']} or prepare "
                             f"the data again with seq_len={expect_seq_len}")
        tok = self.meta["tokenizer"]
        if expect_tokenizer_hash is not None and tok["hash"] != expect_tokenizer_hash:
            raise ValueError(f"{path} was tokenized with {tok['name']!r} (hash {tok['hash']}) but the job's tokenizer "
                             f"has hash {expect_tokenizer_hash}: prepare the data again with the job's tokenizer")
        self.path = path
        self.kind: str = self.meta["kind"]
        self.seq_len: int = self.meta["seq_len"]
        # Read-only maps: pages come from the OS page cache and are shared by every rank on a node.
        self.arrays: Dict[str, np.ndarray] = {
            key: np.memmap(os.path.join(path, spec["file"]), dtype=spec["dtype"], mode="r", shape=tuple(spec["shape"]))
            for key, spec in self.meta["files"].items()
        }

    def __len__(self) -> int:
        return self.meta["num_samples"]

    def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
        return {k: np.asarray(a[i]) for k, a in self.arrays.items()}

    def rows(self, start: int, stop: int) -> Dict[str, np.ndarray]:
        """Rows [start, stop) of every key, wrapping past the end into the next epoch."""
        n = len(self)
        idx = np.arange(start, stop) % n
        if len(idx) and idx[-1] - idx[0] == len(idx) - 1:  # one contiguous slice: a sequential read
            return {k: np.asarray(a[idx[0]:idx[-1] + 1]) for k, a in self.arrays.items()}
        return {k: np.asarray(a[idx]) for k, a in self.arrays.items()}


def iter_batches(ds: MemmapDataset, micro_batch_size: int, rank: int, world_size: int, consumed_samples: int = 0,
                 dynamic_padding: bool = True, pad_token_id: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
    """Endless micro-batches for one data-parallel rank.

    Micro-step k of the job consumes global rows ``[consumed_samples + k*m*w, + m*w)`` (modulo
    ``len(ds)``: the next epoch reads the same order again), and rank r takes the r-th block of
    ``m`` rows of that slice; so a job resumed with ``consumed_samples`` continues exactly.
    Padding positions (attention_mask 0) carry ``pad_token_id``. Packed sft rows also carry
    ``position_ids`` that restart at every sample (see ``lm_inputs``). With ``dynamic_padding`` every
    key is trimmed to the longest row of the batch (chosen_* and rejected_* each to their own;
    left-padded prompt data on the left).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    step = micro_batch_size * world_size
    if len(ds) < step:
        raise ValueError(f"{ds.path} has {len(ds)} rows, fewer than one step needs (micro batch {micro_batch_size} "
                         f"x {world_size} ranks = {step}): use more data or a smaller method.micro_batch_size")
    import torch  # here, so that the data tools start without loading torch

    left = ds.meta.get("padding_side") == "left"
    start = consumed_samples + rank * micro_batch_size
    while True:
        batch = ds.rows(start, start + micro_batch_size)
        start += step
        yield {k: torch.from_numpy(v.astype(np.int64)) for k, v in _finish(batch, dynamic_padding, pad_token_id, left).items()}


def _finish(batch, dynamic_padding, pad_token_id, left):
    out = {}
    for prefix in sorted({k[:-len("attention_mask")] for k in batch if k.endswith("attention_mask")}):
        mask = batch[prefix + "attention_mask"]
        keys = [k for k in batch if k[:len(prefix)] == prefix
                and k[len(prefix):] in ("input_ids", "attention_mask", "labels", "position_ids")]
        cols = slice(None)
        if dynamic_padding:
            used = np.flatnonzero(mask.any(axis=0))
            width = len(used) and (mask.shape[1] - used[0] if left else used[-1] + 1)
            width = max(int(width), 1)
            cols = slice(mask.shape[1] - width, None) if left else slice(0, width)
        for k in keys:
            out[k] = batch[k][:, cols]
        out[prefix + "input_ids"] = np.where(out[prefix + "attention_mask"] == 1, out[prefix + "input_ids"], pad_token_id)
    return out


def lm_inputs(batch: Dict[str, "torch.Tensor"]) -> Dict[str, "torch.Tensor"]:
    """The keyword arguments of a Hugging Face causal LM for a batch. Packed rows give the model
    their ``position_ids`` and no attention mask: transformers then builds attention that does not
    cross samples (block-diagonal causal masks for sdpa/eager, varlen flash-attention), as for
    ``DataCollatorWithFlattening``; the padding after the last sample is a sequence of its own."""
    if "position_ids" not in batch:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    return {"input_ids": batch["input_ids"], "labels": batch["labels"], "position_ids": batch["position_ids"],
            "use_cache": False}  # a cache would switch the packed-sequence masks off
