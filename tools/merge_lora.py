"""Merge a LoRA adapter into its base weights: a plain Hugging Face model directory.

    python tools/merge_lora.py RUN_DIR/final OUT_DIR [--dtype bf16] [--trust-remote-code]

Python code shipped with the base model or tokenizer (``auto_map``) runs only when trusted: by
``--trust-remote-code``, or by the ``model.trust_remote_code`` of the run that wrote the adapter
(``RUN_DIR/config.yaml``).
"""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_trusts_remote_code(adapter: str) -> bool:
    """The ``model.trust_remote_code`` of the hpcllm run whose ``final/`` this is (False if none is found)."""
    from omegaconf import OmegaConf

    config = Path(adapter).resolve().parent / "config.yaml"
    if not config.is_file():
        return False
    return bool(OmegaConf.select(OmegaConf.load(config), "model.trust_remote_code", default=False))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="directory with adapter_config.json (an hpcllm LoRA run's final/)")
    parser.add_argument("output", help="where to write the merged model")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code shipped with the base model or tokenizer (default: the run's setting)")
    args = parser.parse_args(argv)
    from peft import AutoPeftModelForCausalLM

    from hpcllm.data import load_tokenizer

    trust = args.trust_remote_code or run_trusts_remote_code(args.adapter)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    try:
        tokenizer = load_tokenizer(args.adapter, trust_remote_code=trust)
        model = AutoPeftModelForCausalLM.from_pretrained(args.adapter, dtype=dtype, trust_remote_code=trust)
    except ValueError as err:
        from hpcllm.models.build import untrusted_code, untrusted_code_error

        if not untrusted_code(err):
            raise

        print(f"merge_lora: error: {untrusted_code_error(args.adapter)}", file=sys.stderr)
        return 1
    merged = model.merge_and_unload()
    merged.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"merged {args.adapter} into {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
