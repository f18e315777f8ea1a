#!/usr/bin/env bash
# The GPU suite in one command (one H100 / H200, <= 8 minutes): writes benchmarks/RESULTS-gpu.md and .json.
# Needs only what the README installs (pip install -e ".[qlora]") plus the CUDA build of torch; flash-attn 2 is
# measured too where it is installed. Extra flags go to gpu_suite.py (--help lists them; --dry-run runs on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python benchmarks/gpu_suite.py "$@"
