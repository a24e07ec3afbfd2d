"""Merge a LoRA adapter into its base weights: a plain Hugging Face model directory.

    python tools/merge_lora.py RUN_DIR/final OUT_DIR [--dtype bf16]
"""
import argparse
import sys

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="directory with adapter_config.json (an hpcllm LoRA run's final/)")
    parser.add_argument("output", help="where to write the merged model")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    args = parser.parse_args(argv)
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = AutoPeftModelForCausalLM.from_pretrained(args.adapter, dtype=dtype)
    merged = model.merge_and_unload()
    merged.save_pretrained(args.output)
    AutoTokenizer.from_pretrained(args.adapter).save_pretrained(args.output)
    print(f"merged {args.adapter} into {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
