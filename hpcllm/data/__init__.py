"""Record formats, prompt formats per model family, the memmap writer and reader.

    prepare_memmap(...)            jsonl -> memmaps + meta.json (tools/memmap_gen.py is its CLI)
    MemmapDataset(path, ...)       the read-only rows, checked against the job
    iter_batches(ds, ...)          endless per-rank micro-batches, resumable at a sample offset
    lm_inputs(batch)               a batch as a causal LM's arguments (packed rows: per-sample positions)
    load_tokenizer / tokenizer_hash
"""
from hpcllm.data.memmap import DataError, load_model_preset, prepare_memmap
from hpcllm.data.prompts import FORMATS, get_format
from hpcllm.data.reader import MemmapDataset, iter_batches, lm_inputs
from hpcllm.data.tokenizer import DEMO_TOKENIZER_DIR, load_tokenizer, tokenizer_hash

__all__ = ["DEMO_TOKENIZER_DIR", "FORMATS", "DataError", "MemmapDataset", "get_format", "iter_batches",
           "lm_inputs", "load_model_preset", "load_tokenizer", "prepare_memmap", "tokenizer_hash"]
