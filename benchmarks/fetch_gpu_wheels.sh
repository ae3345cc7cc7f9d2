#!/usr/bin/env bash
# Fetch, where a package index is reachable, the wheels that the GPU scripts install offline on a device machine that
# has torch, transformers, accelerate, numpy, pandas and pyarrow but not datasets / evaluate (the vision example reads
# its metric through evaluate, which imports datasets). Into DEST (default .whl/, git-ignored; pass it to the device
# as a carried path), for PYTHON_VERSION on manylinux x86_64:
#
#   bash benchmarks/fetch_gpu_wheels.sh 3.12 [DEST]
#
# The closure of datasets + evaluate + pillow is downloaded, then the wheels of what the device already holds are
# removed to stay small (KEEP_ALL=1 keeps them, if its numpy / pandas / pyarrow turn out too old for this datasets).
# Versions default to the ones the tests pass with (override with DATASETS=..., EVALUATE=...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: fetch_gpu_wheels.sh PYTHON_VERSION [DEST], e.g. 3.12}
DEST=${2:-.whl}
DATASETS=${DATASETS:-5.2.0}
EVALUATE=${EVALUATE:-0.4.6}
mkdir -p "$DEST"
pip download --quiet --python-version "$PY" --only-binary=:all: --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any -d "$DEST" \
  "datasets==$DATASETS" "evaluate==$EVALUATE" pillow 2> >(grep -v "is ignored: it is neither" >&2)
if [ "${KEEP_ALL:-0}" != 1 ]; then
  for present in torch numpy pandas pyarrow transformers tokenizers safetensors huggingface_hub accelerate \
                 nvidia_ triton sympy networkx jinja2 markupsafe mpmath; do
    rm -f "$DEST"/${present}-*.whl "$DEST"/${present}*.whl
  done
fi
ls "$DEST" | sed 's/^/  /'
du -sh "$DEST"
