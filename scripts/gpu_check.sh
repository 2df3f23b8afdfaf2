#!/usr/bin/env bash
# GPU check for the fast path (issue 8): detection, fused add+RMSNorm kernel vs torch
# (correctness and time), a token-split step on two CUDA streams, the multimem kernel's build.
# Needs one CUDA GPU with PyTorch and Triton installed; no network. About 2 minutes on an H100.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (report: OUT_DIR/gpu_check.log and .json)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/gpu-check}}"
mkdir -p "$out"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 || true
  nvidia-smi topo -m 2>&1 | head -20 || true
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} 2>&1 | tee "$out/gpu_check.log"
timeout 300 "$PY" scripts/gpu_check.py --out "$out" 2>&1 | tee -a "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
