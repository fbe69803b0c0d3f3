#!/usr/bin/env bash
# The GPU check (docs/multi-gpu.md): on a machine with CUDA, placement across every visible GPU, a real CUDA OOM,
# NVML against torch.cuda.mem_get_info, and batched decode through mpsd against in-process; one summary line.
# Skipped, with the reason, where there is no GPU. Needs torch with CUDA and the nvml extra in .venv:
#   .venv/bin/pip install -c constraints.txt -e ".[nvml]"   (and a CUDA build of torch for the machine)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the OOM fixture is benchmarks.gpu_check, imported by a worker
exec timeout 300 "${PYTHON:-.venv/bin/python}" -m benchmarks.gpu_check "$@"
