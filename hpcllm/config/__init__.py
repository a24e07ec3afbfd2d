"""Config schemas, composition and validation."""
import os
import socket

from omegaconf import OmegaConf

from hpcllm.config.derive import ConfigError, Derived, derive
from hpcllm.config.schema import JobConfig, register_configs

# Run directories carry host and pid so that two runs started in the same second never collide.
OmegaConf.register_new_resolver("hpcllm.host", lambda: socket.gethostname().split(".")[0], replace=True)
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OmegaConf.register_new_resolver("hpcllm.root", lambda: PROJECT_ROOT, replace=True)
OmegaConf.register_new_resolver("hpcllm.pid", lambda: str(os.getpid()), replace=True)
# Where run directories go: cluster.runs_root, else $HPCLLM_RUNS (a scratch filesystem), else ./runs.
OmegaConf.register_new_resolver("hpcllm.runs", lambda root=None: root or os.environ.get("HPCLLM_RUNS") or "runs",
                                replace=True)
register_configs()

__all__ = ["ConfigError", "Derived", "JobConfig", "PROJECT_ROOT", "derive", "compose"]


def compose(overrides=(), run_dir=None):
    """Compose a job like ``launch.py`` does, for tests and tools (no run directory side effects)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    conf_dir = os.path.join(PROJECT_ROOT, "conf")
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    if run_dir is not None:
        cfg.run_dir = str(run_dir)
    return cfg
