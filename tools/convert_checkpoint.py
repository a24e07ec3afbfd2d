"""Convert weights between a Hugging Face model directory and pipeline layer files (llama, qwen2, mistral).

    python tools/convert_checkpoint.py hf_to_pp HF_DIR PP_DIR
    python tools/convert_checkpoint.py pp_to_hf PP_DIR HF_DIR [--config HF_CONFIG_DIR]

PP_DIR holds one ``layer_XX-model_states.pt`` per pipeline layer (0: embedding, 1..L: decoder layers,
L+1: final norm + head; tied embeddings: L+1 norm, the head reusing layer 0), the files DeepSpeed's
PipelineModule saves and loads, plus ``config.json`` and ``pipeline_manifest.json`` (each file's HF
tensors). pp_to_hf also reads a training checkpoint (RUN/checkpoints/step_*): give ``--config`` (e.g. the
model's HF directory or RUN/final) since a checkpoint has no config.json. Other files of the input
(tokenizer, generation config) are copied along.
"""
import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hpcllm.models.pipeline import (  # noqa: E402
    MANIFEST, PIPE_MODEL_TYPES, hf_to_layer_states, pp_to_hf_state, save_hf_weights, save_layer_files)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".safetensors.index.json", ".bin.index.json")


def load_config(directory: Path):
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        raise SystemExit(f"{directory} has no config.json: give --config DIR with the model's Hugging Face config")
    config = AutoConfig.from_pretrained(directory)
    if config.model_type not in PIPE_MODEL_TYPES:
        raise SystemExit(f"{directory}/config.json: model_type {config.model_type!r} has no pipeline version "
                         f"(supported: {', '.join(PIPE_MODEL_TYPES)})")
    return config


def load_hf_state(directory: Path) -> dict:
    """Every tensor of an HF directory's safetensors (or, without them, pytorch_model*.bin) files."""
    import torch
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise SystemExit(f"{directory} has no *.safetensors or pytorch_model*.bin weights")
    state = {}
    for file in files:
        state.update(load_file(str(file)) if file.suffix == ".safetensors"
                     else torch.load(file, map_location="cpu", weights_only=True))
    return state


def copy_other_files(src: Path, dst: Path) -> None:
    """Tokenizer and other non-weight files, so the converted directory is as usable as the input."""
    for file in src.iterdir():
        skip = file.name in ("config.json", MANIFEST) or file.name.startswith("layer_")
        if file.is_file() and not skip and not file.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy(file, dst / file.name)


def hf_to_pp(src: Path, dst: Path) -> None:
    config = load_config(src)
    save_layer_files(hf_to_layer_states(load_hf_state(src), config), config, dst)
    copy_other_files(src, dst)


def pp_to_hf(src: Path, dst: Path, config_dir: Path | None) -> None:
    config = load_config(config_dir or src)
    save_hf_weights(pp_to_hf_state(src, config), config, dst)
    copy_other_files(src, dst)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=["hf_to_pp", "pp_to_hf"])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--config", type=Path, default=None, help="pp_to_hf: the HF config directory")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        raise SystemExit(f"{args.src} is not a directory")
    try:
        if args.direction == "hf_to_pp":
            hf_to_pp(args.src, args.dst)
        else:
            pp_to_hf(args.src, args.dst, args.config)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"{args.direction} {args.src}: {err}")
    print(f"{args.direction}: wrote {args.dst}")


if __name__ == "__main__":
    main()
