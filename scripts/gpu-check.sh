#!/usr/bin/env bash
# The GPU check of the vLLM connector, prepared for a machine with an NVIDIA GPU and vLLM's CUDA build.
#
# Run from the repository root:  bash scripts/gpu-check.sh
# It needs: Python 3.11, vLLM 0.32's CUDA build and its torch (pip install vllm==0.32.0), and this package
# (pip install -e '.[test]'). It prints what it checked; record the result in docs/integrations.md ("GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import torch, vllm
assert torch.cuda.is_available(), "no CUDA device"
print("torch", torch.__version__, "vllm", vllm.__version__, "device", torch.cuda.get_device_name(0))
PY
# tensors as store values and get outs, CUDA staging included (tests/store/test_torch.py runs its CUDA case here)
python -m pytest -q -p no:cacheprovider tests/store/test_torch.py
# the connector in real engines: on a GPU machine vLLM picks the GPU, its attention backend lays KV blocks out
# its own way ([2, blocks, ...]); the connector reads the block dimension from the cache tensors
VLLM_CPU_KVCACHE_SPACE= VLLM_CPU_NUM_OF_RESERVED_CPU= python -m pytest -q -p no:cacheprovider tests/integrations
