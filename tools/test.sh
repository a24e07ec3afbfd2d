#!/usr/bin/env bash
# The test command: set up, start the local Slurm cluster, run every test (unit, e2e, slurm).
# Extra arguments go to pytest, e.g. `bash tools/test.sh -m "not slurm"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
bash tools/slurm_local.sh start
export DS_ACCELERATOR=cpu
exec .venv/bin/python -m pytest -q "$@"
