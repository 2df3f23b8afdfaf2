#!/usr/bin/env bash
# Make, on a machine with network, what scripts/gpu_check.sh needs on a bare GPU machine:
#   .devcarry/smollm2  the default model packed to 3 bits (51 MiB; scripts/device_pack_model.py):
#                      its 538 MB fp32 / 98 MB GGUF do not fit the device tool's 64 MiB carry
#   .whl/              wheels of the API and gRPC stack for the GPU machine's Python (11 MiB), the
#                      versions this venv runs (torch, numpy, tokenizers, safetensors are there)
# Then carry `.whl tpi_node/proto .devcarry/smollm2` (about 63 MiB with the tree) and run
# `bash scripts/gpu_check.sh $OUT` there.
# Usage: bash scripts/gpu_carry.sh [PYTHON_VERSION of the GPU machine, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYV="${1:-3.12}"
PY=.venv/bin/python
if [ ! -f .devcarry/smollm2/weights.bin ]; then
  model=$($PY -c 'from tpi_node.weights.prepare import resolve_model; print(resolve_model("smollm2-135m-instruct"))')
  $PY scripts/device_pack_model.py pack "$model" .devcarry/smollm2
fi
pins=$($PY -c '
from importlib.metadata import version
names = "grpcio protobuf fastapi starlette pydantic pydantic_core uvicorn h11 anyio sniffio click annotated-types"
names += " typing-inspection prometheus_client typing_extensions"
print(" ".join(f"{n}=={version(n)}" for n in names.split()))')
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086
$PY -m pip download -q --only-binary=:all: --no-deps --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl $pins
du -sh .whl .devcarry/smollm2
