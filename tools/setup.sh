#!/usr/bin/env bash
# Set up hpcllm on a fresh machine: a virtual environment in .venv with the CPU build of torch
# (a plain `torch` requirement would pull a multi-GB CUDA build), DeepSpeed built against it,
# and the package with its test and lm-eval extras. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==${TORCH_VERSION}"
# DeepSpeed ships as source whose build imports torch: build it against the torch above.
.venv/bin/python -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed>=0.14"
# lmeval: lm-evaluation-harness, so the suite runs the eval cross-check (tests/unit/test_eval_lm_eval.py)
pip install -e ".[test,clean,lmeval]"
echo "hpcllm: environment ready in .venv"
