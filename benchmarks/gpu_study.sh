#!/usr/bin/env bash
# One device-sized chunk of a study grid: several study.py workers packed on one GPU until a deadline, then every
# finished run's study_result.json (metrics curve and all_results inside) packed into one file under $OUT, so the
# next device command resumes by carrying the unpacked results back (benchmarks/README.md, "GPU study in chunks").
#
#   bash benchmarks/gpu_study.sh GRID [WORKERS] [BUDGET_S] [ONLY_REGEX]      # defaults: 6 workers, 390 s, every cell
#
# Environment (all optional):
#   RESULTS=runs/gpu        study folders, one per grid (RESULTS/<grid name>); carry this path to resume
#   DATA_ROOT=/tmp/hf_emergence_data   {data_root} of the grid; DATA_TAR (default .data/cifar10_jpg.tar.gz) is
#                           unpacked there when DATA_ROOT/cifar10 is missing
#   WHEELS=.whl             pip wheels (+ requirements.txt) for packages the device image lacks (evaluate, datasets, ...)
#   EXPECTED_RUN_S=300      seconds a run is assumed to take until one run of its cell has finished (then: measured)
#   CACHE_WAIT=2            for grids with an image cache: files the first worker writes before the others start
#   PYTHON=python3, OUT=/tmp/gpu_study_out, DRY_RUN=1 (print the plan and the commands only)
# Writes $OUT/<grid name>_results.tar.gz (RESULTS-relative paths), $OUT/<grid name>_status.txt (every cell's state)
# and $OUT/<grid name>_log.txt (the workers' output). A run cut off at the deadline writes no result: it is redone.
set -uo pipefail
cd "$(dirname "$0")/.."
GRID=${1:?usage: gpu_study.sh GRID [WORKERS] [BUDGET_S] [ONLY_REGEX]}
WORKERS=${2:-6}
BUDGET_S=${3:-390}
ONLY=${4:-}
PYTHON=${PYTHON:-python3}
RESULTS=${RESULTS:-runs/gpu}
DATA_ROOT=${DATA_ROOT:-/tmp/hf_emergence_data}
DATA_TAR=${DATA_TAR:-.data/cifar10_jpg.tar.gz}
WHEELS=${WHEELS:-.whl}
EXPECTED_RUN_S=${EXPECTED_RUN_S:-300}
CACHE_WAIT=${CACHE_WAIT:-2}
OUT=${OUT:-/tmp/gpu_study_out}
for v in WORKERS BUDGET_S EXPECTED_RUN_S CACHE_WAIT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "error: $v must be a whole number, got '${!v}'" >&2; exit 2; }
done
[ -f "$GRID" ] || { echo "error: grid $GRID not found (expected e.g. benchmarks/grids/cifar10_mlp_gpu.json)" >&2; exit 2; }
name=$("$PYTHON" -c 'import json, sys, pathlib; g = json.load(open(sys.argv[1])); print(g.get("name") or pathlib.Path(sys.argv[1]).stem)' "$GRID") \
  || { echo "error: $GRID is not a readable grid file" >&2; exit 2; }
study="$RESULTS/$name"
stop_at=$(( $(date +%s) + BUDGET_S ))
only=(); [ -n "$ONLY" ] && only=(--only "$ONLY")
common=(benchmarks/study.py run "$GRID" --out "$study" --data_root "$DATA_ROOT" "${only[@]}" --stop_at "$stop_at"
        --expected_run_s "$EXPECTED_RUN_S")
mkdir -p "$OUT" "$study"
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "plan: $WORKERS workers until $(date -u -d "@$stop_at" +%H:%M:%S) UTC on $GRID -> $study; results -> $OUT/${name}_results.tar.gz"
  "$PYTHON" "${common[@]}" --dry_run
  exit $?
fi
# Packages the device image lacks (the examples' evaluate/datasets): from the carried wheels, never from a registry.
if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" \
    evaluate datasets accelerate transformers; then
  [ -f "$WHEELS/requirements.txt" ] || { echo "error: evaluate/datasets missing and no $WHEELS/requirements.txt: fetch the wheels here and carry $WHEELS (benchmarks/README.md)" >&2; exit 2; }
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt" || exit 2
fi
if grep -q '{data_root}/cifar10' "$GRID" && [ ! -d "$DATA_ROOT/cifar10/train" ]; then
  [ -f "$DATA_TAR" ] || { echo "error: $DATA_ROOT/cifar10 missing and no $DATA_TAR to unpack (copy ../shared/data/cifar10_jpg.tar.gz to .data/ and carry .data)" >&2; exit 2; }
  mkdir -p "$DATA_ROOT" && tar xzf "$DATA_TAR" -C "$DATA_ROOT" || exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="$OUT/${name}_log.txt"
: > "$log"
pids=()
for n in $(seq 1 "$WORKERS"); do     # each stops by itself at the deadline; timeout is the backstop
  timeout --signal=TERM --kill-after=30 $(( BUDGET_S + 60 )) "$PYTHON" "${common[@]}" > "$OUT/.worker-$n.log" 2>&1 &
  pids+=($!)
  if [ "$n" = 1 ] && [ "$CACHE_WAIT" -gt 0 ] && grep -q HF_EMERGENCE_IMAGE_CACHE "$GRID"; then   # decode once, share
    for _ in $(seq 1 300); do
      [ "$(ls "$DATA_ROOT"/image_cache/*.pt 2>/dev/null | wc -l)" -ge "$CACHE_WAIT" ] && break
      kill -0 "${pids[0]}" 2>/dev/null || break
      sleep 1
    done
  fi
done
wait "${pids[@]}"
for n in $(seq 1 "$WORKERS"); do { echo "===== worker $n"; cat "$OUT/.worker-$n.log"; } >> "$log"; rm -f "$OUT/.worker-$n.log"; done
"$PYTHON" benchmarks/study.py list "$GRID" --out "$study" --data_root "$DATA_ROOT" > "$OUT/${name}_status.txt"
( cd "$RESULTS" && find "$name" -name study_result.json -o -name study_invocations.jsonl | sort \
    | tar czf "$OUT/${name}_results.tar.gz" -T - )
echo "gpu_study: $(grep -c '^ok ' "$OUT/${name}_status.txt") of $(wc -l < "$OUT/${name}_status.txt") cells of $name finished;" \
     "results in $OUT/${name}_results.tar.gz"
