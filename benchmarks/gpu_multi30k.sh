#!/usr/bin/env bash
# Multi30k de->en with the translation example's `small` preset on one GPU, inside 8 minutes (issue 10's GPU target:
# test_2016_flickr >= 33 detokenised sacreBLEU). Reports BLEU (detokenised and tokenised-lowercased), target tokens/s
# and peak GPU memory in $OUT/gpu_multi30k.json (+ the run's metrics.jsonl and predictions).
#
#   bash benchmarks/gpu_multi30k.sh [DATA_DIR] [MINUTES]          # DATA_DIR default ../shared/data/multi30k
#
# Settings, beyond the preset: bf16 mixed precision (accelerate), 4,096-token batches, beam 5 with length penalty 1,
# the average of the last 5 epoch checkpoints. Training stops after MINUTES (default 5.5) of wall time; then the
# averaged model is evaluated on val and test_2016_flickr with beam search. Installs nothing but pip packages.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/multi30k}
MINUTES=${2:-5.5}
OUT=${OUT:-/tmp/gpu_multi30k}
LAUNCH=${LAUNCH:-accelerate launch --num_processes 1 --num_machines 1 --dynamo_backend no}
mkdir -p "$OUT"
for f in train val test_2016_flickr; do
  [ -f "$DATA/$f.de.gz" ] && [ -f "$DATA/$f.en.gz" ] || { echo "error: $DATA/$f.{de,en}.gz not found (DATA_DIR: the Multi30k folder)" >&2; exit 2; }
done
python -c "import sacremoses" 2>/dev/null || pip install -q sacremoses
PRECISION=${PRECISION:-$(python -c "import torch; print('bf16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'no')")}
RUN="$OUT/run"
start=$(date +%s)
set +e
$LAUNCH --mixed_precision "$PRECISION" examples/translation/run.py \
  --train_file "$DATA/train" --validation_file "$DATA/val" --test_file "$DATA/test_2016_flickr" \
  --model_preset small --max_tokens_per_batch 4096 --num_train_epochs 100 --stop_after_minutes "$MINUTES" \
  --eval_steps 1000000 --checkpointing_steps epoch --checkpoints_total_limit 5 --average_last_checkpoints 5 \
  --num_beams 5 --length_penalty 1.0 --logging_steps 50 --no_progress_bar --seed "${SEED:-1}" \
  --output_dir "$RUN" ${EXTRA_ARGS:-} > "$OUT/log.txt" 2>&1
status=$?
set -e
end=$(date +%s)
grep -E "error|recipe|BLEU|signature|reached|average" "$OUT/log.txt" || true
python - "$RUN" "$OUT" "$((end - start))" "$status" "$PRECISION" <<'EOF'
import json, statistics, sys
from pathlib import Path
run, out, wall, status, precision = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l] if (run / "metrics.jsonl").exists() else []
final = next((r for r in reversed(records) if r.get("final")), {})
speed = [r["target_tokens_per_s"] for r in records if "target_tokens_per_s" in r][1:]
try:
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
except Exception:  # noqa: BLE001
    device = "unknown"
summary = {"exit_code": status, "wall_seconds": wall, "device": device, "mixed_precision": precision,
           "steps": final.get("step"), "test_bleu": final.get("test_bleu"), "test_tok_bleu": final.get("test_tok_bleu"),
           "test_chrf": final.get("test_chrf"), "validation_bleu": final.get("validation_bleu"),
           "validation_tok_bleu": final.get("validation_tok_bleu"), "averaged_checkpoints": final.get("averaged_checkpoints"),
           "median_target_tokens_per_s": statistics.median(speed) if speed else None,
           "gpu_max_memory_gib": final.get("gpu_max_memory_gib"), "bleu_signature": final.get("bleu_signature"),
           "target_test_bleu": 33.0}
(out / "gpu_multi30k.json").write_text(json.dumps(summary, indent=1) + "\n")
for name in ("metrics.jsonl", "test_predictions.txt", "all_results.json"):
    if (run / name).exists():
        (out / name).write_bytes((run / name).read_bytes())
print(json.dumps(summary, indent=1))
EOF
exit "$status"
