#!/usr/bin/env bash
# One GPU-machine session: correctness tests on the fused kernels, then the benchmark.
# Usage (on the GPU machine, from the repo root): bash tools/gpu_session.sh [pytest paths...]
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
OUT=${OUT:-bench_results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"
python -m pytest -q -p no:cacheprovider -x ${@:-tests/test_attention_gpu.py} 2>&1 | tail -40
python tools/bench_attention.py --out "$OUT/attention.json"
