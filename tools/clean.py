"""Clean and deduplicate a corpus before tokenization (datatrove underneath); the output is memmap_gen's input.

    python tools/clean.py preset=zh_web input=raw/ output=clean/zh workers=8
    python tools/clean.py preset=en_web input=raw/ output=clean/en cluster=slurm slurm.partition=cpu
    python tools/clean.py preset=sft input=sft.jsonl output=clean/sft minhash.n_grams=3
    python tools/memmap_gen.py input=clean/zh/data output=data/zh model=... seq_len=2048

``preset`` picks conf/clean/<preset>.yaml (zh_web, en_web, sft); every other key=value overrides it
(Hydra syntax: ``blacklist.enabled=true blacklist.path=words.txt``, ``exact_dedup.enabled=false``).
A misspelt key fails naming it. Rerunning the same command resumes: finished tasks are skipped.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from contextlib import contextmanager  # noqa: E402

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from hpcllm.clean import CleanConfigError, register, run_clean  # noqa: E402

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "clean")


@contextmanager
def _without_job_groups():
    """Hide the job's config groups (model, cluster, ...) that hpcllm.config puts in Hydra's global
    ConfigStore when both are loaded in one process: there ``cluster=slurm`` would name a group, not
    this tool's ``cluster`` key."""
    from hpcllm.config.schema import GROUP_SCHEMAS

    repo = ConfigStore.instance().repo
    hidden = {group: repo.pop(group) for group in GROUP_SCHEMAS if group in repo}
    try:
        yield
    finally:
        repo.update(hidden)


def compose_config(argv):
    presets = sorted(f[:-5] for f in os.listdir(CONF_DIR) if f.endswith(".yaml"))
    preset = next((a.split("=", 1)[1] for a in argv if a.startswith("preset=")), "zh_web")
    if preset not in presets:
        raise CleanConfigError(f"preset={preset!r} is not one of {', '.join(presets)} (conf/clean/)")
    register()
    with _without_job_groups(), initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name=preset, overrides=[a for a in argv if not a.startswith("preset=")])
    missing = [k for k in ("input", "output") if OmegaConf.is_missing(cfg, k)]
    if missing:
        raise CleanConfigError(f"missing {' '.join(f'{k}=...' for k in missing)}")
    return cfg


def main(argv) -> int:
    try:
        cfg = compose_config(argv)
        report = run_clean(cfg)
    except (CleanConfigError, HydraException, OmegaConfBaseException, FileNotFoundError, ValueError) as e:
        print(f"clean: error: {e}", file=sys.stderr)
        return 2
    if report:
        r = report
        print(f"clean: {r['input']['documents']:,} documents in, {r['output']['documents']:,} out "
              f"({r['removed']['fraction_documents']:.1%} removed); report: "
              f"{os.path.join(cfg.output, 'clean_report.md')}; data: {r['output']['data']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
