"""The data stage: jsonl in, fixed-shape memmaps out (``prepare_memmap``).

It runs once, ahead of training, with memory that does not grow with the corpus:

1. the parent streams the input lines in chunks to ``num_workers`` processes (at most two
   chunks per worker in flight), which parse, render the prompt format, tokenize and build
   rows of ``seq_len``;
2. each finished row goes to one of several shard files on disk, picked at random (seeded);
3. every shard, small enough for memory, is permuted (seeded) and appended to the memmaps.

Steps 2-3 are a shard-then-shuffle global shuffle, so training reads rows in order.
Everything is written into a temporary directory next to the output, and ``meta.json``,
written last, is renamed into place with the rest only when complete.
"""
from __future__ import annotations

import collections
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from hpcllm.data.encode import IGNORE, KINDS, MODES, ChunkResult, Encoder, keys_for, kind_of
from hpcllm.data.files import DataError, file_digest, find_inputs, read_lines
from hpcllm.data.prompts import get_format
from hpcllm.data.records import RecordError, Text, parse_line
from hpcllm.data.tokenizer import load_tokenizer, tokenizer_hash

FORMAT_VERSION = 1
# Work is handed to the workers in chunks this big: small enough to balance the load, big
# enough that sending them costs little next to tokenizing them.
CHUNK_CHARS = 256 << 10
CHUNK_RECORDS = 2048
SHARD_BYTES = 32 << 20  # rows of one shard are held in memory once, when it is shuffled
MAX_SHARDS = 1000  # open files; corpora beyond ~5 GB of text get proportionally larger shards
CONF_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf", "model")


def load_model_preset(model_preset: Union[str, dict, None]) -> dict:
    """``{"name", "prompt_format", "special_tokens", "tokenizer", "trust_remote_code"}`` from a conf/model preset name,
    a preset-like dict, or None (no prompt format: pretraining text only)."""
    if model_preset is None:
        return {"name": None, "prompt_format": None, "special_tokens": {}, "tokenizer": None, "trust_remote_code": False}
    from omegaconf import DictConfig, OmegaConf

    if isinstance(model_preset, str):
        path = os.path.join(CONF_MODEL_DIR, f"{model_preset}.yaml")
        if not os.path.isfile(path):
            names = sorted(f[:-5] for f in os.listdir(CONF_MODEL_DIR) if f.endswith(".yaml"))
            raise ValueError(f"unknown model preset {model_preset!r}; valid: {', '.join(names)}")
        model_preset = OmegaConf.load(path)
    if isinstance(model_preset, DictConfig):  # a preset file or a composed job's cfg.model
        model_preset = OmegaConf.to_container(model_preset, resolve=True)
    preset = dict(model_preset)
    get_format(preset["prompt_format"])  # fail early on an unknown id
    return {"name": preset.get("name"), "prompt_format": preset["prompt_format"],
            "special_tokens": dict(preset.get("special_tokens") or {}), "tokenizer": preset.get("tokenizer"),
            "trust_remote_code": bool(preset.get("trust_remote_code", False))}


def prepare_memmap(input: str, output: str, tokenizer_spec: Optional[str], seq_len: int, mode: str = "pack",
                   model_preset: Union[str, dict, None] = None, kind: str = "auto", num_workers: int = 1,
                   seed: int = 1234, on_error: str = "fail", overwrite: bool = False, eval_fraction: float = 0.0,
                   progress: bool = True, max_prompt_len: Optional[int] = None,
                   prompt_format: Optional[str] = None, trust_remote_code: Optional[bool] = None) -> dict:
    """Tokenize ``input`` (jsonl files or directories) into memmaps under ``output``; returns meta.json.

    ``eval_fraction`` > 0 holds out that share of the (shuffled) rows in ``output + "_eval"``.
    ``kind="auto"`` takes the kind of the first record. Preference and prompt data are always
    truncated (``mode`` applies to pretrain and sft data). A conversation too long for ``seq_len``
    loses its prompt's oldest tokens first (the system message is kept), then its answer's end;
    ``max_prompt_len`` caps every prompt so. ``prompt_format`` overrides the preset's; without
    either, conversations take the tokenizer's own chat template (``prompt_format=tokenizer``). ``trust_remote_code``: None = the model preset's.
    """
    _check_args(seq_len, mode, kind, num_workers, on_error, eval_fraction, max_prompt_len)
    output = os.path.abspath(output)
    outputs = {"train": output, "eval": output + "_eval"} if eval_fraction > 0 else {"train": output}
    files = find_inputs(input)
    for path in outputs.values():
        check_output(path, [p for p in input.split(",") if p] + files, overwrite)
    preset = load_model_preset(model_preset)
    trust = preset["trust_remote_code"] if trust_remote_code is None else trust_remote_code
    tokenizer = load_tokenizer(tokenizer_spec or preset["tokenizer"], trust_remote_code=trust)
    if kind == "auto":
        kind = _detect_kind(files)
    if prompt_format is not None:
        preset["prompt_format"] = get_format(prompt_format).id
    if kind != "pretrain" and preset["prompt_format"] is None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{kind} data needs a prompt format: set model=<conf/model preset> (e.g. tiny_llama), "
                             "or use a tokenizer with a chat_template")
        preset["prompt_format"] = "tokenizer"  # no family named: the tokenizer's own template
    encoder_args = (tokenizer_spec or preset["tokenizer"], preset["prompt_format"], preset["special_tokens"], kind, seq_len, mode,
                    max_prompt_len, trust)
    encoder = _make_encoder(*encoder_args, tokenizer=tokenizer)  # checks the special tokens before any work
    encoder.check_round_trip(_sample_texts(files, encoder))
    used_mode = mode if kind in ("pretrain", "sft") else "truncate"
    keys = keys_for(kind, used_mode)
    input_bytes = sum(os.path.getsize(f) for f in files)
    # ~1 token per 2 bytes of text at most, 4 bytes per key and token while shuffling
    num_shards = int(min(MAX_SHARDS, max(1, math.ceil(input_bytes * 2 * len(keys) / SHARD_BYTES))))

    os.makedirs(os.path.dirname(output), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(output) + ".tmp-", dir=os.path.dirname(output))
    previous_sigterm = _sigterm_as_interrupt()
    try:
        shards = _Shards(tmp, num_shards, len(keys) * seq_len, seed)
        stats = _generate(files, encoder, encoder_args, num_workers, on_error, shards, kind, used_mode, seq_len, progress)
        meta_common = {
            "format_version": FORMAT_VERSION, "kind": kind, "mode": used_mode, "requested_mode": mode,
            "seq_len": seq_len, "padding_side": "left" if kind == "prompt" else "right",
            "labels": "aligned with input_ids (the model shifts them); -100 = not learned" if kind != "prompt" else None,
            "tokenizer": {"name": tokenizer_spec or preset["tokenizer"], "hash": tokenizer_hash(tokenizer),
                          "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                          "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
            "model_preset": preset["name"], "prompt_format": preset["prompt_format"],
            "special_tokens": encoder.tokens if preset["prompt_format"] else {},
            "inputs": [{"path": os.path.abspath(f), "size": os.path.getsize(f), "sha256": file_digest(f)} for f in files],
            "num_records": stats["records"], "num_records_used": stats["records"] - sum(stats["errors"].values()),
            "skipped": dict(stats["errors"]), "skipped_samples": dict(stats["skipped"]),
            "truncated_samples": stats["truncated"], "truncated_prompts": stats["prompts_cut"],
            "truncated_answers": stats["answers_cut"], "max_prompt_len": max_prompt_len, "on_error": on_error, "seed": seed,
            "shuffle": f"shard-then-shuffle over {num_shards} shards", "eval_fraction": eval_fraction,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        metas = _write_memmaps(tmp, shards, keys, seq_len, len(tokenizer), eval_fraction, meta_common)
        for split, path in outputs.items():
            _move_into_place(os.path.join(tmp, split), path, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    _summary(metas["train"], stats)
    return metas["train"]


def is_memmap_output(path: str) -> bool:
    """A directory this module wrote: it holds a meta.json with our format fields."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and {"format_version", "files", "tokenizer"} <= set(meta)


def check_output(output: str, inputs: List[str], overwrite: bool):
    """Refuse an output that would destroy or feed back into data: overwrite only ever replaces
    an earlier memmap output, never an input, a file or a directory of something else."""
    out = os.path.realpath(output)
    for spec in inputs:
        inp = os.path.realpath(spec)
        if out == inp or inp.startswith(out + os.sep) or out.startswith(inp + os.sep):
            relation = "is" if out == inp else "contains" if inp.startswith(out + os.sep) else "lies inside"
            raise FileExistsError(f"output={output} {relation} the input {spec}: writing there would destroy "
                                  "or feed back into the input; choose an output outside the inputs")
    if not os.path.lexists(output):
        return
    if not os.path.isdir(output) or os.path.islink(output):
        raise FileExistsError(f"output={output} is an existing file, not a memmap directory: choose another output "
                              "(overwrite=true only replaces an earlier memmap_gen output)")
    if not os.listdir(output):
        return  # an empty directory made ready for the output: nothing to lose
    if not is_memmap_output(output):
        raise FileExistsError(f"output={output} is a directory that is not a memmap_gen output (no meta.json): "
                              "choose another output, or move it away yourself (overwrite=true only replaces "
                              "an earlier memmap_gen output)")
    if not overwrite:
        raise FileExistsError(f"{output} already exists (an earlier memmap_gen output): pass overwrite=true to replace it")


def _sigterm_as_interrupt():
    """SIGTERM (``kill``, Slurm's end of job) unwinds like Ctrl-C, so that the temporary output
    is removed. Only where nobody else handles SIGTERM; returns the handler to restore, or None."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"memmap_gen stopped by signal {signum}")

    return signal.signal(signal.SIGTERM, interrupt)


def _check_args(seq_len, mode, kind, num_workers, on_error, eval_fraction, max_prompt_len=None):
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: valid modes are {', '.join(MODES)}")
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"kind={kind!r}: valid kinds are auto, {', '.join(KINDS)}")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error={on_error!r}: valid values are fail, skip")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: must be at least 2")
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers}: must be at least 1")
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction}: must be in [0, 1)")
    if max_prompt_len is not None and not 0 < max_prompt_len < seq_len:
        raise ValueError(f"max_prompt_len={max_prompt_len}: must be between 1 and seq_len-1={seq_len - 1} "
                         "(the answer needs room), or unset")


def _detect_kind(files: List[str]) -> str:
    first_error = None
    for path in files:
        for lineno, line in read_lines(path):
            try:
                return kind_of(parse_line(line))
            except RecordError as e:
                first_error = first_error or f"{path}:{lineno}: {e}"
    raise DataError(f"no valid record in {files[0]}{' ...' if len(files) > 1 else ''}: cannot detect the kind of data; "
                    f"the first record: {first_error}")


def _sample_texts(files: List[str], encoder: Encoder, count: int = 32) -> List[str]:
    """The text of the first usable records (conversations without their template)."""
    out = []
    for lineno, line in read_lines(files[0]):
        try:
            record = parse_line(line)
        except RecordError:
            continue
        chat = getattr(record, "prompt", record)
        out.append(record.text if isinstance(record, Text) else
                   "\n".join(t.content if isinstance(t.content, str) else "".join(p for p, _ in t.content) for t in chat.turns))
        if len(out) >= count:
            break
    return out


def _make_encoder(tokenizer_spec, format_id, special_tokens, kind, seq_len, mode, max_prompt_len,
                  trust_remote_code=False, tokenizer=None) -> Encoder:
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_spec, trust_remote_code=trust_remote_code)
    return Encoder(tokenizer, get_format(format_id) if format_id else None, special_tokens, kind, seq_len, mode, max_prompt_len)


_WORKER_ENCODER: Optional[Encoder] = None


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _worker_init(encoder_args):
    global _WORKER_ENCODER
    # One process per core already: the Rust tokenizer's own thread pool would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C is the parent's to handle: it stops the pool and removes the unfinished output.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool stops its workers with SIGTERM
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked while the parent forked us
    _WORKER_ENCODER = _make_encoder(*encoder_args)


def _worker_process(lines):
    return _WORKER_ENCODER.process(lines)


def _chunks(files) -> Iterator[List[Tuple[int, int, str]]]:
    chunk, size = [], 0
    for file_idx, path in enumerate(files):
        for lineno, line in read_lines(path):
            chunk.append((file_idx, lineno, line))
            size += len(line)
            if size >= CHUNK_CHARS or len(chunk) >= CHUNK_RECORDS:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def _results(files, encoder, encoder_args, num_workers) -> Iterator[ChunkResult]:
    """Chunk results in input order; a bounded number in flight, so memory stays flat."""
    if num_workers == 1:
        for chunk in _chunks(files):
            yield encoder.process(chunk)
        return
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    # A stop signal while the pool forks would leave workers that no `with` terminates (and an exit
    # that waits for them): it is held until the pool exists, then stops it like any other.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pool = ctx.Pool(num_workers, initializer=_worker_init, initargs=(encoder_args,))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    with pool:
        pending = collections.deque()
        for chunk in _chunks(files):
            pending.append(pool.apply_async(_worker_process, (chunk,)))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _generate(files, encoder, encoder_args, num_workers, on_error, shards, kind, mode, seq_len, progress) -> dict:
    from tqdm import tqdm

    stats = {"records": 0, "tokens": 0, "truncated": 0, "prompts_cut": 0, "answers_cut": 0, "errors": collections.Counter(),
             "skipped": collections.Counter()}
    carry = np.zeros(0, np.int32)  # pack mode: text tokens not yet filling a row
    start = time.time()
    with tqdm(unit=" rec", desc="memmap_gen", disable=not progress, file=sys.stderr, mininterval=1.0) as bar:
        for result in _results(files, encoder, encoder_args, num_workers):
            for file_idx, lineno, reason, message in result.errors:
                if on_error == "fail":
                    raise DataError(f"{files[file_idx]}:{lineno}: {message} [{reason}]; fix the record "
                                    "or pass on_error=skip to skip and count such records")
                stats["errors"][reason] += 1
            stats["records"] += result.records
            stats["tokens"] += result.tokens
            stats["truncated"] += result.truncated
            stats["prompts_cut"] += result.prompts_cut
            stats["answers_cut"] += result.answers_cut
            stats["skipped"].update(result.skipped)
            shards.add(np.concatenate([result.rows[k] for k in keys_for(kind, mode)], axis=1) if result.rows else None)
            if len(result.stream):
                buf = np.concatenate([carry, result.stream])
                n = len(buf) // seq_len
                shards.add(_text_rows(buf[:n * seq_len].reshape(n, seq_len), encoder.pad_id, keys=keys_for(kind, mode)))
                carry = buf[n * seq_len:]
            bar.update(result.records)
            bar.set_postfix_str(f"{stats['tokens'] / max(time.time() - start, 1e-9):,.0f} tok/s", refresh=False)
    if len(carry):
        row = np.full((1, seq_len), encoder.pad_id, np.int32)
        row[0, :len(carry)] = carry
        shards.add(_text_rows(row, encoder.pad_id, length=len(carry), keys=keys_for(kind, mode)))
    stats["seconds"] = time.time() - start
    return stats


def _text_rows(ids: np.ndarray, pad_id: int, length: Optional[int] = None, keys=()) -> np.ndarray:
    mask = np.ones_like(ids)
    if length is not None:
        mask[:, length:] = 0
    labels = np.where(mask == 1, ids, IGNORE).astype(np.int32)
    columns = [ids, mask, labels]
    if "position_ids" in keys:  # pretraining text packed among sft samples: one sequence a row
        columns.append(np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape))
    return np.concatenate(columns, axis=1)


class _Shards:
    """Rows go to a random shard file; ``shuffled()`` gives each shard back permuted."""

    def __init__(self, directory: str, num_shards: int, width: int, seed: int):
        self.paths = [os.path.join(directory, f"shard-{i:04d}.bin") for i in range(num_shards)]
        self.files = [open(p, "wb") for p in self.paths]
        self.width, self.seed = width, seed
        self.rng = np.random.default_rng(seed)
        self.num_rows = 0

    def add(self, rows: Optional[np.ndarray]):
        if rows is None or not len(rows):
            return
        which = self.rng.integers(len(self.files), size=len(rows))
        for k in np.unique(which):
            self.files[k].write(np.ascontiguousarray(rows[which == k], dtype=np.int32).tobytes())
        self.num_rows += len(rows)

    def shuffled(self) -> Iterator[np.ndarray]:
        for f in self.files:
            f.close()
        for i, path in enumerate(self.paths):
            rows = np.fromfile(path, np.int32).reshape(-1, self.width)
            os.remove(path)
            yield rows[np.random.default_rng([self.seed, i]).permutation(len(rows))]


def dtypes_for(keys, vocab_size: int) -> Dict[str, str]:
    ids = "uint16" if vocab_size <= 65536 else "int32"
    return {k: ids if k.endswith("input_ids") else "uint8" if k.endswith("attention_mask") else "int32" for k in keys}


def _write_memmaps(tmp, shards, keys, seq_len, vocab_size, eval_fraction, meta_common) -> Dict[str, dict]:
    total = shards.num_rows
    if total == 0:
        raise DataError("no samples were produced: every record was skipped (see the counts above)")
    num_eval = min(total - 1, max(1, round(total * eval_fraction))) if eval_fraction > 0 else 0
    sizes = {"train": total - num_eval, "eval": num_eval} if num_eval else {"train": total}
    dtypes = dtypes_for(keys, vocab_size)
    arrays = {}
    for split, n in sizes.items():
        os.makedirs(os.path.join(tmp, split))
        arrays[split] = {k: np.memmap(os.path.join(tmp, split, f"{k}.bin"), dtype=dtypes[k], mode="w+", shape=(n, seq_len))
                         for k in keys}
    counts = {split: {"tokens": 0, "learned": 0} for split in sizes}
    num_sequences = sum(k.endswith("attention_mask") for k in keys)  # 2 for preference: chosen and rejected
    pos = 0
    for rows in shards.shuffled():
        for split, lo, hi in (("train", 0, sizes["train"]), ("eval", sizes["train"], total)):
            a, b = max(pos, lo), min(pos + len(rows), hi)
            if a >= b:
                continue
            part = rows[a - pos:b - pos]
            for j, k in enumerate(keys):
                block = part[:, j * seq_len:(j + 1) * seq_len]
                arrays[split][k][a - lo:b - lo] = block
                if k.endswith("attention_mask"):
                    counts[split]["tokens"] += int(block.sum())
                if k.endswith("labels"):
                    counts[split]["learned"] += int((block != IGNORE).sum())
        pos += len(rows)
    metas = {}
    for split, n in sizes.items():
        for a in arrays[split].values():
            a.flush()
        meta = dict(meta_common, split=split, num_samples=n,
                    files={k: {"file": f"{k}.bin", "dtype": dtypes[k], "shape": [n, seq_len]} for k in keys},
                    num_tokens=counts[split]["tokens"],
                    num_learned_tokens=counts[split]["learned"] if "prompt" != meta_common["kind"] else None,
                    padding_ratio=round(1 - counts[split]["tokens"] / (n * seq_len * num_sequences), 6))
        with open(os.path.join(tmp, split, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
        metas[split] = meta
    return metas


def _move_into_place(src: str, dst: str, tmp: str):
    """Rename the finished directory in; an old one (overwrite=true) is moved aside first, then deleted."""
    if os.path.exists(dst):
        os.rename(dst, os.path.join(tmp, "replaced-" + os.path.basename(dst)))
    os.rename(src, dst)


def _summary(meta, stats):
    rate = meta["num_tokens"] / max(stats["seconds"], 1e-9)
    print(f"memmap_gen: {meta['num_samples']} {meta['kind']} rows of {meta['seq_len']} tokens from "
          f"{stats['records']} records in {stats['seconds']:.1f}s ({rate:,.0f} tok/s), "
          f"padding {meta['padding_ratio']:.1%}, {_truncation(meta, stats)}", file=sys.stderr)
    skipped = dict(stats["errors"]) | {f"{k} (samples)": v for k, v in stats["skipped"].items()}
    if skipped:
        print("memmap_gen: SKIPPED " + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
              + " (counts in meta.json)", file=sys.stderr)


def _truncation(meta, stats) -> str:
    unit = "pairs" if meta["kind"] == "preference" else "samples"
    if not stats["truncated"]:
        return f"no {unit} truncated"
    return (f"{stats['truncated']} {unit} truncated (prompt cut from the left in {stats['prompts_cut']}, "
            f"answer cut at the end in {stats['answers_cut']})")
