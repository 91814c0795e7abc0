#!/usr/bin/env bash
# One GPU check (issue 15 item 9), about 8 minutes on one H100/H200-class GPU; writes one markdown report.
#   bash bench/gpu_check.sh                 # on a machine with a CUDA GPU: every stage at full size
#   bash bench/gpu_check.sh --dry-run       # every stage at toy size on the CPU: checks the script itself
#   bash bench/gpu_check.sh --out DIR       # report and smoke run under DIR (default runs/gpu_check)
# Stages: LoDisc / MoCo v3 step (images/s, MFU) for ViT-S/16 and ViT-B/16 at 224 px in bf16; GLSim step;
# kNN on a 1M x 384 bank (faiss, on the GPU when faiss is a GPU build, vs torch on the GPU); the momentum
# pass and one training step's memory at 448 px; a 100-step bf16 pretraining smoke run on synthetic images.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=runs/gpu_check
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=$2; shift ;;
    *) echo "error: unknown argument '$1'; usage: bash bench/gpu_check.sh [--dry-run] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
if [ "$DRY" = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "error: bench/gpu_check.sh needs a CUDA GPU and torch sees none here; run 'bash bench/gpu_check.sh --dry-run' to check every stage at toy size on the CPU" >&2
  exit 2
fi
rm -rf "$OUT/smoke" "$OUT/smoke_data"  # a fresh smoke run each time
mkdir -p "$OUT"
REPORT=$OUT/report.md
if [ "$DRY" = 1 ]; then
  DEV=cpu
  S_MODELS=("vit_tiny_patch16_224 --img-size 32 --patch-size 8 --batch 4 --repeats 1 --warmup 0")
  GLSIM="--model vit_tiny_patch16_224 --img-size 64 --batch 2 --repeats 1 --warmup 0"
  KNN="--bank 2000 --queries 100 --k 20"
  MEM="--models vit_tiny_patch16_224 --img-size 32 --batch 2"
  MOM="--model vit_tiny_patch16_224 --img-size 32 --batch 2 --repeats 1"
  SMOKE_IMAGES=64 SMOKE="train.batch_size=16 train.max_steps=3 train.epochs=1 train.knn_samples=32"
  PIPE="--variants workers:0:1,device:0:1 --rounds 1 --steps 2 --warmup 1"
else
  DEV=cuda
  S_MODELS=("vit_small_patch16_224 --batch 256" "vit_base_patch16_224 --batch 128")
  GLSIM="--model vit_base_patch16_224 --img-size 448 --batch 16"
  KNN="--bank 1000000 --queries 10000 --k 200"
  MEM="--models vit_small_patch16_224,vit_base_patch16_224 --img-size 448 --batch 32"
  MOM="--model vit_base_patch16_224 --img-size 448 --batch 128"
  SMOKE_IMAGES=2048 SMOKE="train.batch_size=128 train.max_steps=100 train.epochs=10"
  PIPE="--variants workers:4:0,device:4:0 --rounds 3"
fi
{
  echo "# GPU check ($([ "$DRY" = 1 ] && echo "dry run: toy sizes on the CPU" || echo "full"))"
  echo
  echo "$(date -u +%FT%TZ); $("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU', '| torch', torch.__version__)"); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} > "$REPORT"
stage() {  # stage TITLE COMMAND...: runs it from bench/, output into the report under its command
  local title=$1; shift
  echo "== $title" >&2
  { echo; echo "## $title"; echo; echo "    $*"; echo; } >> "$REPORT"
  local start=$SECONDS
  if (cd bench && "$@") > "$OUT/stage.log" 2>&1; then
    cat "$OUT/stage.log" >> "$REPORT"
    echo "($((SECONDS - start)) s)" >> "$REPORT"
  else
    { echo '```'; tail -n 30 "$OUT/stage.log"; echo '```'; echo "**FAILED** after $((SECONDS - start)) s"; } >> "$REPORT"
    FAILED=1
  fi
}
FAILED=0
PYB=$(cd "$(dirname "$PY")" 2>/dev/null && pwd)/$(basename "$PY")
[ -x "$PYB" ] || PYB=$PY
for spec in "${S_MODELS[@]}"; do
  # shellcheck disable=SC2086
  stage "LoDisc / MoCo v3 step, bf16: $spec" "$PYB" step_flops.py --model $spec --device $DEV --amp bf16
done
# shellcheck disable=SC2086
stage "GLSim step, bf16" "$PYB" glsim_step.py $GLSIM --device $DEV --amp bf16
# shellcheck disable=SC2086
stage "kNN, exact, on $DEV" "$PYB" knn.py $KNN --dim 384 --device $DEV --variants matmul faiss torch
# shellcheck disable=SC2086
stage "Momentum pass with the CLS attention read-out" "$PYB" momentum_pass.py $MOM --device $DEV --amp bf16
# shellcheck disable=SC2086
stage "Peak memory of one training step" "$PYB" memory.py $MEM --device $DEV --amp bf16
if [ -f data/sample/train_val.csv ]; then
  # shellcheck disable=SC2086
  stage "Input pipeline: PIL workers against the batched augmentation on $DEV" "$PYB" input_pipeline.py --device $DEV $PIPE
else
  { echo; echo "## Input pipeline"; echo; echo "skipped: data/sample is missing (make data builds it offline)"; } >> "$REPORT"
fi
DATA=$(cd "$OUT" && pwd)/smoke_data
"$PY" - "$DATA" "$SMOKE_IMAGES" <<'PYEOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root, n = Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
rows = {"train_val": ["class_id,dir"], "test": ["class_id,dir"]}
for i in range(n + n // 4):  # 10 classes: a bright square of the class's grey level on noise
    split, c = ("train_val" if i < n else "test"), i % 10
    img = rng.integers(0, 60, (28, 28), dtype=np.uint8)
    y, x = rng.integers(0, 14, 2)
    img[y : y + 14, x : x + 14] = 100 + 15 * c
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).convert("RGB").save(root / "images" / split / f"{i:05d}.png")
    rows[split].append(f"{c},{split}/{i:05d}.png")
for split, lines in rows.items():
    (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
(root / "val.csv").write_text((root / "test.csv").read_text())
PYEOF
# shellcheck disable=SC2086
stage "Pretraining smoke run, bf16 (synthetic 28 px images, the sample recipe)" "$PYB" ../train_ssl.py \
  --config ../configs/pretrain/sample.yaml data.root="$DATA" data.num_workers=2 output_dir="$(cd "$OUT" && pwd)/smoke" \
  train.mixed_precision=bf16 train.warmup_epochs=0 train.checkpoint_every=1000 $SMOKE
rm -f "$OUT/stage.log"
echo "report: $REPORT"
[ "$FAILED" = 0 ] || { echo "error: a stage failed; its output is in $REPORT" >&2; exit 1; }
