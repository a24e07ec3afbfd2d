"""Prepare training data once, ahead of training: jsonl -> fixed-shape memmaps + meta.json.

    python tools/memmap_gen.py input=data/demo/sft.jsonl output=data/sft_tiny_llama \\
        model=tiny_llama seq_len=128 mode=pack num_workers=2

Keys (Hydra-style key=value): ``--help`` lists them with their docs; an unknown key is an error
that lists the valid ones. ``tokenizer`` defaults to the model preset's tokenizer.
"""
import inspect
import os
import re
import sys
from dataclasses import dataclass
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omegaconf import MISSING, OmegaConf  # noqa: E402
from omegaconf.errors import ConfigKeyError  # noqa: E402

from hpcllm.data import DataError, load_model_preset, prepare_memmap  # noqa: E402


@dataclass
class MemmapGenConfig:
    input: str = MISSING  # .jsonl/.json files (plain, .zst or .gz) or directories of them, comma-separated
    output: str = MISSING  # the directory to write, outside the inputs
    seq_len: int = MISSING  # tokens a row holds (the job's method.seq_len)
    model: Optional[str] = None  # conf/model preset: prompt format, special tokens, default tokenizer
    tokenizer: Optional[str] = None  # path, hub name or "demo"; None = the model preset's
    prompt_format: Optional[str] = None  # a format id or "tokenizer" (its chat_template); None = the preset's
    mode: str = "pack"  # pack | truncate | split (pretrain and sft data)
    kind: str = "auto"  # auto | pretrain | sft | preference | prompt
    num_workers: int = 1  # tokenizing processes (one per core)
    seed: int = 1234  # of the shuffle
    on_error: str = "fail"  # fail | skip (counted in meta.json)
    overwrite: bool = False  # replace an earlier memmap_gen output at output= (never anything else)
    eval_fraction: float = 0.0  # held out into OUTPUT_eval
    max_prompt_len: Optional[int] = None  # cap on a sample's prompt tokens (cut from the left, system kept)
    progress: bool = True  # a progress bar on stderr
    trust_remote_code: Optional[bool] = None  # run the tokenizer's own Python code (auto_map); None = the preset's


def usage() -> str:
    """The module's usage and every key with its one-line doc (the comment beside its field)."""
    fields = re.findall(r"^    (\w+): [^=]+= ([^#\n]+?)\s*# (.*)$", inspect.getsource(MemmapGenConfig), re.M)
    width = max(len(name) for name, _, _ in fields)
    keys = "\n".join(f"  {name:<{width}}  {doc} (default: {default.replace('MISSING', 'required')})"
                     for name, default, doc in fields)
    return f"{__doc__.strip()}\n\nkeys:\n{keys}"


def main(argv) -> int:
    if {"--help", "-h", "help"} & set(argv):
        print(usage())
        return 0
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(MemmapGenConfig), OmegaConf.from_cli(argv))
        missing = [k for k in ("input", "output", "seq_len") if OmegaConf.is_missing(cfg, k)]
        if missing:
            raise ValueError(f"missing {', '.join(f'{k}=...' for k in missing)}")
    except (ConfigKeyError, ValueError) as e:
        valid = ", ".join(MemmapGenConfig.__dataclass_fields__)
        print(f"memmap_gen: {str(e).splitlines()[0]}\nvalid keys: {valid}", file=sys.stderr)
        return 2
    tokenizer = cfg.tokenizer or load_model_preset(cfg.model)["tokenizer"]
    try:
        prepare_memmap(cfg.input, cfg.output, tokenizer, cfg.seq_len, cfg.mode, cfg.model, kind=cfg.kind,
                       num_workers=cfg.num_workers, seed=cfg.seed, on_error=cfg.on_error, overwrite=cfg.overwrite,
                       eval_fraction=cfg.eval_fraction, progress=cfg.progress, max_prompt_len=cfg.max_prompt_len,
                       prompt_format=cfg.prompt_format, trust_remote_code=cfg.trust_remote_code)
    except (DataError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"memmap_gen: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
