#!/usr/bin/env bash
# Multi30k de->en with the translation example's `small` preset on one GPU, inside 8 minutes (issue 10's GPU target:
# test_2016_flickr >= 33 detokenised sacreBLEU). Reports BLEU (detokenised and tokenised-lowercased), target tokens/s
# and peak GPU memory in $OUT/gpu_multi30k.json (+ the run's metrics.jsonl and predictions).
#
#   bash benchmarks/gpu_multi30k.sh [DATA_DIR] [MINUTES]          # DATA_DIR default ../shared/data/multi30k
#
# Settings, beyond the preset: bf16 mixed precision (accelerate), 4,096-token batches, lr 4e-3 with 200 warm-up
# steps, beam 5 with length penalty 1, the average of the last 5 epoch checkpoints. Training stops after MINUTES
# (default 5.5) of wall time; then the averaged model is evaluated on val and test_2016_flickr with beam search.
#
# Offline: nothing is downloaded. The repository is used in place (PYTHONPATH, no `pip install -e .`, whose build
# step would fetch setuptools). Packages the machine lacks (on the nvidia-h200 image: datasets, evaluate, dill,
# multiprocess, sacremoses) are installed from wheels fetched beforehand with benchmarks/fetch_gpu_wheels.sh into
# WHEELS (default .whl; the device tool's `carry`), with `pip install --no-index --find-links`; the version ranges
# checked are setup.py's. DRY_RUN=1 checks and prints the plan and the training command, and installs and runs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
DATA=${1:-../shared/data/multi30k}
MINUTES=${2:-5.5}
OUT=${OUT:-/tmp/gpu_multi30k}
WHEELS=${WHEELS:-.whl}
PY=${PYTHON:-python3}
LAUNCH=${LAUNCH:-$PY -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for f in train val test_2016_flickr; do
  [ -f "$DATA/$f.de.gz" ] && [ -f "$DATA/$f.en.gz" ] || { echo "error: $DATA/$f.{de,en}.gz not found (DATA_DIR: the Multi30k folder)" >&2; exit 2; }
done
# What the translation example imports, checked against setup.py's ranges.
NEEDED="torch transformers huggingface_hub safetensors accelerate datasets evaluate sacrebleu sacremoses tokenizers tqdm numpy"
unmet=$($PY benchmarks/gpu_requirements.py $NEEDED)
if [ -n "$unmet" ]; then
  echo "not installed or out of setup.py's range: $(echo $unmet)"
  if [ ! -f "$WHEELS/requirements.txt" ]; then
    echo "error: no $WHEELS/requirements.txt to install them from offline: run 'bash benchmarks/fetch_gpu_wheels.sh 3.12 $WHEELS' where pip reaches a registry and carry $WHEELS (or set WHEELS)" >&2
    exit 2
  fi
  INSTALL="$PY -m pip install -q --no-index --find-links $WHEELS --no-cache-dir --no-compile -r $WHEELS/requirements.txt"
  echo "installing from $WHEELS: $INSTALL"
  if [ "${DRY_RUN:-0}" != 1 ]; then
    $INSTALL
    unmet=$($PY benchmarks/gpu_requirements.py $NEEDED)
    [ -z "$unmet" ] || { echo "error: still unmet after installing from $WHEELS: $(echo $unmet)" >&2; exit 2; }
  fi
fi
mkdir -p "$OUT"
PRECISION=${PRECISION:-$($PY -c "import torch; print('bf16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'no')")}
RUN="$OUT/run"
start=$(date +%s)
set +e
CMD=($LAUNCH --mixed_precision "$PRECISION" examples/translation/run.py
  --train_file "$DATA/train" --validation_file "$DATA/val" --test_file "$DATA/test_2016_flickr"
  --model_preset small --max_tokens_per_batch 4096 --learning_rate 4e-3 --num_warmup_steps 200
  --num_train_epochs 100 --stop_after_minutes "$MINUTES"
  --eval_steps 1000000 --checkpointing_steps epoch --checkpoints_total_limit 5 --average_last_checkpoints 5
  --num_beams 5 --length_penalty 1.0 --logging_steps 50 --no_progress_bar --seed "${SEED:-1}"
  --output_dir "$RUN" ${EXTRA_ARGS:-})
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "would run: ${CMD[*]}"
  exit 0
fi
"${CMD[@]}" > "$OUT/log.txt" 2>&1
status=$?
set -e
end=$(date +%s)
grep -E "error|recipe|BLEU|signature|reached|average" "$OUT/log.txt" || true
$PY - "$RUN" "$OUT" "$((end - start))" "$status" "$PRECISION" "$((end - t0))" <<'EOF'
import json, statistics, sys
from pathlib import Path
run, out, wall, status, precision, total = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l] if (run / "metrics.jsonl").exists() else []
final = next((r for r in reversed(records) if r.get("final")), {})
speed = [r["target_tokens_per_s"] for r in records if "target_tokens_per_s" in r][1:]
try:
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
except Exception:  # noqa: BLE001
    device = "unknown"
summary = {"exit_code": status, "wall_seconds": wall, "total_seconds_with_install": total, "device": device, "mixed_precision": precision,
           "steps": final.get("step"), "test_bleu": final.get("test_bleu"), "test_tok_bleu": final.get("test_tok_bleu"),
           "test_chrf": final.get("test_chrf"), "validation_bleu": final.get("validation_bleu"),
           "validation_tok_bleu": final.get("validation_tok_bleu"), "averaged_checkpoints": final.get("averaged_checkpoints"),
           "median_target_tokens_per_s": statistics.median(speed) if speed else None,
           "gpu_max_memory_gib": final.get("gpu_max_memory_gib"), "bleu_signature": final.get("bleu_signature"),
           "target_test_bleu": 33.0, "target_minutes": 8, "within_8_minutes": total <= 480}
(out / "gpu_multi30k.json").write_text(json.dumps(summary, indent=1) + "\n")
for name in ("metrics.jsonl", "test_predictions.txt", "all_results.json"):
    if (run / name).exists():
        (out / name).write_bytes((run / name).read_bytes())
print(json.dumps(summary, indent=1))
EOF
exit "$status"
