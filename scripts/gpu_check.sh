#!/usr/bin/env bash
# GPU check of the fast path, in one go on one GPU (issues 8 and 17), no network, ~4 minutes:
#  1. scripts/gpu_check.py: detection, the fused add+RMSNorm kernel vs torch (correctness, time),
#     a token-split step on two CUDA streams, the multimem kernel compiled and launched with every
#     lane masked off (the launch that faulted on 2026-11-26);
#  2. scripts/gpu_serve_check.py, twice: the default model served through the real API with
#     --fast-path auto and --fast-path off (greedy text, TTFT of a 4096-token prompt, decode
#     tokens/s, a profiler trace of a served request);
#  3. OUT/gpu-results.md: the section for docs/gpu-results.md, written from both.
# A bare GPU machine: the wheels the API and gRPC need there are installed from .whl/ when it is
# carried, and the default model comes packed to 3 bits in .devcarry/smollm2 (it does not fit the
# carry limit as it is); `bash scripts/gpu_carry.sh` prepares both on a machine with network.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]     env: PYTHON (python3), MODEL (a model dir or name)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/gpu-check}}"
mkdir -p "$out"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tpi-site .whl/*.whl \
    && export PYTHONPATH="/tmp/tpi-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TPI_HOME="${TPI_HOME:-$(mktemp -d /tmp/tpi-home-XXXX)}"  # this run's shard cache
MODEL="${MODEL:-}"
if [ -z "$MODEL" ] && [ -f .devcarry/smollm2/weights.bin ]; then
  "$PY" scripts/device_pack_model.py unpack .devcarry/smollm2 /tmp/smollm2-q3 >/dev/null && MODEL=/tmp/smollm2-q3
fi
MODEL="${MODEL:-smollm2-135m-instruct}"
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), model $MODEL"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 || true
  nvidia-smi topo -m 2>&1 | head -20 || true
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  "$PY" -c 'import fastapi, uvicorn, pydantic, grpc, google.protobuf, tokenizers, safetensors; print("serving imports ok")'
} 2>&1 | tee "$out/gpu_check.log"
timeout 240 "$PY" scripts/gpu_check.py --out "$out" 2>&1 | tee -a "$out/gpu_check.log"
rc=${PIPESTATUS[0]}
for mode in auto off; do
  echo "--- serving, --fast-path $mode" | tee -a "$out/gpu_check.log"
  timeout 200 "$PY" scripts/gpu_serve_check.py --model "$MODEL" --fast-path "$mode" --out "$out/serve-$mode.json" \
    >"$out/serve-$mode.log" 2>&1
  src=$?
  tail -40 "$out/serve-$mode.log" | tee -a "$out/gpu_check.log"
  [ "$src" -eq 0 ] || rc=1
done
"$PY" scripts/gpu_serve_check.py --report "$out" 2>&1 | tee -a "$out/gpu_check.log" || rc=1
exit "$rc"
