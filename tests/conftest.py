import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
sys.path.insert(0, str(ROOT))


def pytest_addoption(parser):
    parser.addoption("--require-slurm", action="store_true",
                     help="fail (instead of skip) the Slurm tests when the local cluster is not up; implied by CI=true")
