"""What a resumed run may change and what it may not (torch-free: the launcher checks before it writes).

Every checkpoint holds the ``config.yaml`` it was trained with and ``data.json``, the fingerprint
of each memmap it read (from the memmap's ``meta.json``: input hashes, tokenizer hash, seq_len).
On resume the new config is compared with the checkpoint's:

- what defines the run (model, tokenizer, data, seq_len, the method and its adapter, seed, ZeRO
  stage, precision, data-parallel size) cannot change: the launch is refused naming the key;
- the optimization (``method.lr`` and the schedule, weight decay, betas, clipping, ``train.max_steps``,
  ``method.epochs``, the batch size) may: it is applied from the resumed step on, printed, and
  appended to ``config_changes.jsonl``; ``config.yaml`` is the config of the latest launch;
- anything else (logging, saving, cluster and hardware settings that keep the world size) changes freely.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from hpcllm.config import ConfigError

CONFIG_RECORD = "config.yaml"  # inside each checkpoint: the config it was trained with
DATA_RECORD = "data.json"  # inside each checkpoint: fingerprints of the memmaps it read
CHANGES_LOG = "config_changes.jsonl"  # in the run dir: what each resume changed, at which step

# Optimization settings a resumed run may change (``method.`` keys); applied from the resumed step on.
MAY_CHANGE = {"method.lr", "method.min_lr_ratio", "method.schedule", "method.warmup_steps", "method.warmup_ratio",
              "method.weight_decay",
              "method.adam_beta1", "method.adam_beta2", "method.grad_clip", "method.epochs",
              "method.micro_batch_size", "method.global_batch_size", "method.ppo.critic_lr", "train.max_steps"}
# Prefixes of keys that define the run: a change would continue another model or data from this state.
FIXED = ("model.", "method.", "data.", "seed", "zero.stage", "train.precision", "train.tensor_parallel",
         "train.pipeline_parallel", "hw.nodes", "hw.gpus_per_node", "hw.accelerator")
NOT_COMPARED = {"run_dir", "resume", "dry_run", "wait", "data.dynamic_padding", "data.allow_demo_data"}
RECORDS = ("method.recipe_sources.",)  # where a value came from, not a setting: follows the values compared
# The memmap facts that identify its content.
FINGERPRINT_KEYS = ("inputs_sha256", "tokenizer_hash", "seq_len", "kind", "mode", "num_samples", "seed")


def flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def _why_fixed(key: str) -> str:
    if key.startswith(("hw.", "train.tensor", "train.pipeline")):
        return "it changes the number of ranks, and each rank's share of the ZeRO state is saved apart"
    if key.startswith("data."):
        return "the run would continue on other data than the one its samples were counted in"
    return "the checkpoint holds the state of the run it defines"


def compare_configs(old, new) -> tuple[list[str], dict]:
    """(refusals, changes): a message per key that cannot change; {key: [old, new]} of the others."""
    before, after = flatten(_plain(old)), flatten(_plain(new))
    refusals, changes = [], {}
    for key in sorted(set(before) | set(after)):
        if key in NOT_COMPARED or key.startswith(RECORDS) or key not in before or key not in after or before[key] == after[key]:
            continue  # a key only one side has: the schema grew, the user changed nothing
        if key not in MAY_CHANGE and key.startswith(FIXED):
            refusals.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r} ({_why_fixed(key)})")
        else:
            changes[key] = [before.get(key), after.get(key)]
    return refusals, changes


def memmap_fingerprint(memmap_dir: str | Path) -> dict | None:
    """What identifies a prepared memmap's content (None: no meta.json there)."""
    meta_file = Path(memmap_dir) / "meta.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    return {"inputs_sha256": sorted(i.get("sha256") for i in meta.get("inputs", [])),
            "tokenizer_hash": (meta.get("tokenizer") or {}).get("hash"), "seq_len": meta.get("seq_len"),
            "kind": meta.get("kind"), "mode": meta.get("mode"), "num_samples": meta.get("num_samples"),
            "seed": meta.get("seed")}


def data_record(data_paths: dict) -> dict:
    """split -> {"path", "fingerprint"} of the memmaps a run reads (written into each checkpoint)."""
    return {split: {"path": str(path), "fingerprint": memmap_fingerprint(path)}
            for split, path in data_paths.items() if path}


def compare_data(recorded: dict, data_paths: dict) -> list[str]:
    """A message per memmap whose content is not the one the checkpoint was trained on."""
    problems = []
    for split, then in recorded.items():
        path = data_paths.get(split)
        now = memmap_fingerprint(path) if path else None
        if then.get("fingerprint") is None or now is None:
            continue  # not prepared yet (the launcher prepares it from data.*, compared above)
        differ = [k for k in FINGERPRINT_KEYS if then["fingerprint"].get(k) != now.get(k)]
        if differ:
            problems.append(f"the {split} memmap {path} is not the one this run trained on (its meta.json "
                            f"differs in {', '.join(differ)}): it was replaced by another corpus or preparation")
    return problems


def recorded_config(checkpoint: Path, run_dir: Path) -> DictConfig | None:
    """The config a checkpoint was trained with (older checkpoints: the run dir's config.yaml)."""
    for file in (checkpoint / CONFIG_RECORD, run_dir / "config.yaml"):
        if file.is_file():
            return OmegaConf.load(file)
    return None


def recorded_data(checkpoint: Path) -> dict:
    file = checkpoint / DATA_RECORD
    return json.loads(file.read_text()) if file.is_file() else {}


def refuse(checkpoint: Path, refusals: list[str]) -> ConfigError:
    return ConfigError(
        f"cannot resume from {checkpoint} with this config:\n  " + "\n  ".join(refusals) +
        "\nset those keys back to the checkpoint's values (see its config.yaml), or start a new run in "
        "another hydra.run.dir")


def never_over(run_dir: Path, latest: Path) -> ConfigError:
    return ConfigError(f"resume=never, but {run_dir} holds checkpoints of an earlier run (latest {latest.name}); "
                       "training from scratch there would mix the two runs: pass another hydra.run.dir for a new "
                       "run, or resume=auto to continue that one")


def log_changes(run_dir: Path, step: int, changes: dict) -> None:
    """Say what a resume changes and append it to config_changes.jsonl (config.yaml shows the new values)."""
    if not changes:
        return
    shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
    print(f"hpcllm: resuming at step {step} with changes, applied from here on: {shown} "
          f"(recorded in {run_dir / CHANGES_LOG})", flush=True)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed_at_step": step, "changes": changes}
    with open(run_dir / CHANGES_LOG, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")


def check_resume(cfg, checkpoint: Path, run_dir: Path, data_paths: dict) -> dict:
    """Refuse to continue ``checkpoint`` with another model, data or method; return what may change."""
    old = recorded_config(checkpoint, run_dir)
    refusals, changes = compare_configs(old, cfg) if old is not None else ([], {})
    refusals += compare_data(recorded_data(checkpoint), data_paths)
    if refusals:
        raise refuse(checkpoint, refusals)
    return changes
