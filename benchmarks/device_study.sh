#!/usr/bin/env bash
# Run one study grid with several study.py workers side by side (one per --only regex) until a deadline, e.g. on a
# single GPU machine, then stop them cleanly (SIGTERM: the run in flight writes no result and is redone next time).
#
#   DATA_ROOT=/tmp/d bash benchmarks/device_study.sh GRID STUDY_DIR DEADLINE_S REGEX [REGEX ...]
#
# Each worker's log is STUDY_DIR.worker-N.log. Finished runs are kept; rerunning the same command continues.
set -u
grid=$1; out=$2; deadline=$3; shift 3
mkdir -p "$out"
n=0
for rx in "$@"; do
  n=$((n + 1))
  timeout --signal=TERM --kill-after=30 "$deadline" \
    python3 benchmarks/study.py run "$grid" --out "$out" --data_root "${DATA_ROOT:?set DATA_ROOT}" --only "$rx" \
    > "$out.worker-$n.log" 2>&1 &
done
wait
echo "device_study: $(ls "$out"/*/study_result.json 2>/dev/null | wc -l) runs with a result in $out"
