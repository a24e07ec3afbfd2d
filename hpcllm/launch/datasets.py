"""Where a job's memmap data lives: a prepared directory as given, or jsonl prepared once into the run dir."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from hpcllm.config import ConfigError


def _is_memmap(path: str) -> bool:
    return (Path(path) / "meta.json").is_file()


def memmap_paths(cfg: DictConfig, run_dir: Path) -> dict:
    """{"train": dir, "eval": dir or None, "pretrain": dir or None} as the training job reads them."""
    paths = {}
    for split in ("train", "eval", "pretrain"):
        source = cfg.data[split]
        if source is None:
            paths[split] = None
        elif _is_memmap(source):
            paths[split] = str(source)
        else:
            paths[split] = str(run_dir / "data" / split)
    if paths["eval"] is None and cfg.data.eval_fraction > 0 and not _is_memmap(cfg.data.train or ""):
        paths["eval"] = paths["train"] + "_eval"
    return paths


def check_prepared_sources(cfg: DictConfig) -> None:
    """Prepared data given as data.train/eval/pretrain must fit the job: checked in the dry run."""
    from hpcllm.data import load_tokenizer
    from hpcllm.data.reader import check_prepared

    for split in ("train", "eval", "pretrain"):
        source = cfg.data[split]
        if source is not None and _is_memmap(source):
            try:
                check_prepared(str(source), f"data.{split}", cfg.method.seq_len, cfg.model.tokenizer or cfg.model.path,
                               load=load_tokenizer)
            except ValueError as e:
                raise ConfigError(str(e)) from None


def ensure_memmaps(cfg: DictConfig, run_dir: Path) -> dict:
    """Prepare every jsonl source of the job into run_dir/data (once; a resumed run reuses it)."""
    from hpcllm.data import prepare_memmap

    paths = memmap_paths(cfg, run_dir)
    if cfg.method.stage == "eval" and cfg.eval.benchmark != "perplexity":
        return paths  # multiple-choice benchmarks read their own files
    for split in ("train", "eval", "pretrain"):
        source = cfg.data[split]
        if source is None or _is_memmap(source) or _is_memmap(paths[split]):
            continue
        if not Path(source).exists():
            raise ConfigError(f"data.{split}={source} does not exist: give a jsonl file/directory or a memmap_gen output")
        if Path(paths[split]).exists():
            raise ConfigError(f"{paths[split]} (data.{split} prepared for this run) exists but holds no meta.json: an "
                              f"interrupted or damaged preparation. Remove it (rm -r '{paths[split]}') and launch again "
                              "to prepare it anew, or prepare it yourself with tools/memmap_gen.py "
                              f"input={source} output=DIR ... and set data.{split}=DIR")
        kind = "pretrain" if split == "pretrain" else cfg.method.data_kind
        prepare_memmap(
            input=str(source), output=paths[split], tokenizer_spec=cfg.model.tokenizer or cfg.model.path,
            seq_len=cfg.method.seq_len, mode=cfg.data.mode if kind == "pretrain" else "truncate",
            model_preset=OmegaConf.to_container(cfg.model, resolve=True), kind=kind, seed=cfg.seed,
            eval_fraction=cfg.data.eval_fraction if split == "train" else 0.0,
            max_prompt_len=cfg.data.get("max_prompt_len") if kind != "pretrain" else None,
        )
    return paths
