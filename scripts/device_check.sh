#!/usr/bin/env bash
# Device check (issue 9): greedy text of a CUDA node, a CPU node and mixed clusters of real
# `tpi-node` processes over gRPC on loopback must be the same; decode tokens/s per device; peak
# device memory with a window of 2 layers vs resident; why bf16 decode was slow on CUDA.
# Needs no network: the models are synthesized from a seed, plus the default model's packed 3-bit
# copy when .devcarry/smollm2 is there (scripts/device_pack_model.py pack ...).
#
#   scripts/device_check.sh [cuda|cuda:N|mps|cpu]      (default cuda; cpu = dry run of the flow)
#   env: OUT (where the log, JSON and worker logs go), PYTHON (default python3), TOKENS (default 32),
#        MODELS (default tiny, smollm2 if carried, random-0.5b), DEADLINE (seconds, default 250:
#        optional runs left after it are skipped), TESTS=0 to skip tests/test_device.py at the end
# Under 5 minutes on one H100. Exit status 1 when an equality check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cuda}
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/tpi-device-out-XXXX)}
WORK=$(mktemp -d /tmp/tpi-device-work-XXXX)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
START=$SECONDS
{
  echo "== device check $(date -u +%FT%TZ) on $(hostname), device $DEVICE"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cpu threads', torch.get_num_threads())"
  MODELS_SET=${MODELS:-}; MODELS=${MODELS:-tiny}
  if [ -z "${MODELS_SET:-}" ] && [ -f .devcarry/smollm2/weights.bin ]; then
    "$PY" scripts/device_pack_model.py unpack .devcarry/smollm2 "$WORK/smollm2-q3" >/dev/null && MODELS="$MODELS,$WORK/smollm2-q3"
  fi
  [ -z "${MODELS_SET:-}" ] && [ "$DEVICE" != cpu ] && MODELS="$MODELS,random-0.5b"
  "$PY" scripts/device_check.py --device "$DEVICE" --models "$MODELS" --tokens "${TOKENS:-32}" \
      --out "$OUT/device-check.json" --workdir "$WORK" --deadline "${DEADLINE:-250}"
  rc=$?
  if [ "${TESTS:-1}" != 0 ] && [ $((SECONDS - START)) -lt "${DEADLINE:-250}" ]; then
    echo "== tests/test_device.py (the CUDA tests run only where CUDA is)"
    "$PY" -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tail -8
  fi
  echo "== device_check.py exit status $rc after $((SECONDS - START)) s"
  exit $rc
} 2>&1 | tee "$OUT/device-check.log"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit $rc
