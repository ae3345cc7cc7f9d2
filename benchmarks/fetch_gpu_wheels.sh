#!/usr/bin/env bash
# Download, here (where a package registry is reachable), the wheels that benchmarks/gpu_multi30k.sh needs on a
# device machine that has no internet: the packages its image lacks, at the versions tested with the examples.
#
#   bash benchmarks/fetch_gpu_wheels.sh [PYTHON_VERSION] [DEST]        # defaults: 3.12 .whl
#
# The device image (nvidia-h200) already has torch, transformers, accelerate, huggingface_hub, tokenizers, sacrebleu,
# pyarrow, pandas, numpy, xxhash, fsspec, aiohttp, requests, tqdm, pyyaml, regex, click and joblib; it lacks
# datasets, evaluate, dill, multiprocess and sacremoses (about 2 MB). Those are fetched with --no-deps (their other
# needs are in the image), plus a fallback for datasets 5.2's cap fsspec <= 2026.9.0, which pip takes only if the
# image's fsspec is outside the range. datasets 5.2 also needs pyarrow >= 24: WITH_PYARROW=1 adds a pyarrow 26 wheel
# (53 MB: with the working tree that nearly fills the device tool's 64 MiB; only for an image with an older pyarrow).
# DEST gets a requirements.txt naming the packages to install; gpu_multi30k.sh installs from it with
#   pip install --no-index --find-links DEST -r DEST/requirements.txt
# DEST must be git-ignored (.whl/ is) and carried to the device machine (the device tool's `carry` option).
set -euo pipefail
PYV=${1:-3.12}
DEST=${2:-.whl}
PIP=${PIP:-python3 -m pip}
case "$PYV" in
  3.[0-9]|3.[0-9][0-9]) ;;
  *) echo "error: PYTHON_VERSION must look like 3.12, got '$PYV'" >&2; exit 2 ;;
esac
# Missing on the device image: the examples' data (datasets), metric wrapper (evaluate) and tokenised BLEU
# (sacremoses) with datasets' own needs. Versions: the ones the examples are tested with (setup.py's floors:
# datasets>=3.0, evaluate>=0.4.3, sacremoses>=0.1).
# pillow: the vision example's image decoding (gpu_cifar_resnet18.sh), in case the image lacks it.
REQUIRED=(datasets==5.2.0 evaluate==0.4.6 sacremoses==0.2.0 dill==0.4.1 multiprocess==0.70.19 pillow==13.0.0)
FALLBACKS=(fsspec==2026.9.0)
[ "${WITH_PYARROW:-0}" = 1 ] && FALLBACKS+=(pyarrow==26.0.1)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
mkdir -p "$DEST"
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp "${PLATFORMS[@]}" \
  -d "$DEST" "${REQUIRED[@]}" "${FALLBACKS[@]}"
# What gpu_multi30k.sh installs: the required packages by pin; the fallbacks only through the resolver.
printf '%s\n' "${REQUIRED[@]}" > "$DEST/requirements.txt"
echo "fetched for Python $PYV into $DEST ($(du -sh "$DEST" | cut -f1)):"
ls "$DEST"
