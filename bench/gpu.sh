#!/usr/bin/env bash
# The GPU benchmark as one prepared script (under 5 minutes on one GPU); on a machine without CUDA
# it runs a dry pass on the CPU. Run from the repository root with the project's venv active.
#   bash bench/gpu.sh [--queries 50000]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
limit=290  # the GPU run's budget; the dry CPU pass on a busy 2-core machine may take longer
python -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda); sys.exit(not torch.cuda.is_available())" || limit=1200
if command -v nvidia-smi >/dev/null && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "a GPU is present but this torch is a CPU build: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" >&2
fi
timeout $limit python -u bench/gpu.py "$@"
