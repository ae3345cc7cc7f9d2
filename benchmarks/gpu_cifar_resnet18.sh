#!/usr/bin/env bash
# CIFAR-10 ResNet-18 (hf_emergence's CIFAR ResNet: 3x3 stem, no max-pool) on one GPU in one command, inside 8 minutes:
# issue 12's GPU target (>= 93% test accuracy; goal >= 94% in under 2 minutes of training). Two arms one after the
# other with the same seed and recipe: the Kaiming base init (baseline) and the emergence init (library defaults:
# alpha 1.1, one k per conv). Writes $OUT/gpu_cifar_resnet18.json (per arm: test accuracy, wall and training seconds,
# median images/s, peak GPU memory, exit code) and each arm's metrics.jsonl.
#
#   bash benchmarks/gpu_cifar_resnet18.sh [DATA_TAR] [EPOCHS]     # DATA_TAR default ../shared/data/cifar10_jpg.tar.gz
#
# Recipe (short-schedule CIFAR ResNet practice: Page's "How to train your ResNet" reaches 94% in 24 epochs with batch
# 512, Nesterov SGD, peak lr 0.4, weight decay 5e-4, a linear warm-up to the peak at ~20% of training and a linear
# decay to 0, label smoothing, half precision, flip + 4-pixel crop; kuangliu/pytorch-cifar's ResNet-18 reaches 95% with
# SGD lr 0.1 at batch 128, wd 5e-4 in 200 epochs): 18 epochs of batch 500 (98 steps of the 49,000 training images),
# Nesterov SGD momentum 0.9, peak lr 0.2 reached linearly at 20% of the steps then linear to 0, weight decay 5e-4 on
# conv/linear weights, label smoothing 0.1, no gradient clipping, bf16 autocast, channels_last, torch.compile.
# Batch 500 divides the 49,000 training images and eval batch 1,000 the 1,000 validation and 10,000 test images, so
# every batch has one shape and the compiled graphs are never rebuilt. Validation: 2% held out of train (seeded);
# the test folder is read once, at the end.
#
# Installs nothing from the internet: if datasets / evaluate / PIL are missing, the wheels that
# benchmarks/fetch_gpu_wheels.sh put in .whl/ are installed with pip --no-index (carry .whl to the device).
# Data path: the example's in-memory path (uint8 tensors decoded once into $DATA_ROOT/image_cache, augmented in
# DataLoader workers); the on-device uint8 path of the imagedata branch is not on main yet (set EXTRA_ARGS for it).
set -euo pipefail
cd "$(dirname "$0")/.."
TAR=${1:-../shared/data/cifar10_jpg.tar.gz}
EPOCHS=${2:-18}
OUT=${OUT:-/tmp/gpu_cifar_resnet18}
DATA_ROOT=${DATA_ROOT:-/tmp/hf_emergence_data}
ARM_SECONDS=${ARM_SECONDS:-225}          # per-arm limit: two arms + set-up stay under 8 minutes
ALPHA=${ALPHA:-1.1}
SPEED_ARGS=${SPEED_ARGS:---mixed_precision bf16 --channels_last yes --torch_compile}   # "" for a CPU smoke run
mkdir -p "$OUT" "$DATA_ROOT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_EMERGENCE_IMAGE_CACHE="$DATA_ROOT/image_cache"
python -c "import datasets, evaluate, PIL" 2>/dev/null || {
  [ -d .whl ] || { echo "error: datasets/evaluate/PIL missing and no .whl/ (run benchmarks/fetch_gpu_wheels.sh 3.12)" >&2; exit 2; }
  pip install --quiet --no-index --find-links .whl -r .whl/requirements.txt
}
if [ ! -d "$DATA_ROOT/cifar10/train/airplane" ]; then
  [ -f "$TAR" ] || { echo "error: $TAR not found (the CIFAR-10 JPG tar with cifar10/{train,test}/<class>/)" >&2; exit 2; }
  tar xzf "$TAR" -C "$DATA_ROOT"
fi
WARMUP=$((98 * EPOCHS / 5))
COMMON=(--model_type cifar_resnet --train_dir "$DATA_ROOT/cifar10/train" --test_dir "$DATA_ROOT/cifar10/test"
        --validation_split_percentage 2 --num_train_epochs "$EPOCHS" --per_device_train_batch_size 500
        --per_device_eval_batch_size 1000 --optimizer sgd --learning_rate 0.2 --momentum 0.9 --nesterov
        --weight_decay 5e-4 --lr_scheduler_type linear --num_warmup_steps "$WARMUP" --label_smoothing 0.1
        --max_grad_norm 0 --dataloader_num_workers 8
        --logging_steps 49 --eval_steps epoch --no_progress_bar --seed "${SEED:-1}" --overwrite_output_dir)
declare -A ARMS=([baseline]="--init kaiming" [emergence]="--init emergence --alpha $ALPHA")
for arm in baseline emergence; do
  start=$SECONDS
  set +e
  # shellcheck disable=SC2086
  timeout --signal=TERM --kill-after=20 "$ARM_SECONDS" python examples/vision/run.py "${COMMON[@]}" ${ARMS[$arm]} \
    $SPEED_ARGS --output_dir "$OUT/$arm" ${EXTRA_ARGS:-} > "$OUT/$arm.log" 2>&1
  echo $? > "$OUT/$arm.exit_code"
  set -e
  echo $((SECONDS - start)) > "$OUT/$arm.wall_seconds"
  grep -E "^(validation|test):|error|stopped" "$OUT/$arm.log" | sed "s/^/$arm: /" || true
done
python - "$OUT" "$EPOCHS" "$ALPHA" <<'EOF'
import json, statistics, sys
from pathlib import Path
out, epochs, alpha = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
try:
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    versions = {"torch": torch.__version__}
    import transformers, accelerate
    versions.update(transformers=transformers.__version__, accelerate=accelerate.__version__)
except Exception as err:  # noqa: BLE001
    device, versions = f"unknown ({err})", {}
summary = {"device": device, "versions": versions, "epochs": epochs, "target_test_accuracy": 0.93, "goal": "0.94 in < 120 s",
           "arms": {}}
for arm in ("baseline", "emergence"):
    run = out / arm
    path = run / "metrics.jsonl"
    records = [json.loads(l) for l in path.read_text().splitlines() if l] if path.exists() else []
    final = next((r for r in reversed(records) if r.get("final")), {})
    train = [r for r in records if "images_per_s" in r]
    speed = [r["images_per_s"] for r in train[1:]]          # the first interval holds the compile time
    summary["arms"][arm] = {
        "init": "kaiming base init (alpha 1)" if arm == "baseline" else f"emergence, alpha {alpha}, one k per conv",
        "exit_code": int((out / f"{arm}.exit_code").read_text()), "wall_seconds": float((out / f"{arm}.wall_seconds").read_text()),
        # the training loop up to its last logged step: compile time and the per-epoch validation included
        "train_seconds": train[-1]["elapsed_s"] if train else None,
        "steps": final.get("step"), "test_accuracy": final.get("test_accuracy"), "test_loss": final.get("test_loss"),
        "validation_accuracy": final.get("validation_accuracy"), "epoch1_accuracy": final.get("epoch1_accuracy"),
        "median_images_per_s": statistics.median(speed) if speed else None,
        "gpu_max_memory_gib": final.get("gpu_max_memory_gib"),
        "validation_curve": [(r["epoch"], r["validation_accuracy"]) for r in records
                             if "validation_accuracy" in r and not r.get("final")]}
    if path.exists():
        (out / f"{arm}_metrics.jsonl").write_bytes(path.read_bytes())
(out / "gpu_cifar_resnet18.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
EOF
