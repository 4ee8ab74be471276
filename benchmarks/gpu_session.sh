#!/usr/bin/env bash
# Times the restore and trains on one CUDA GPU, run from the repository root: a GPU speed row
# (benchmarks/restore_speed.py), then trainings side by side on the one GPU: the IRN's adversarial fine-tune at
# adv_weight 0.5 and 1.0 (configs/irn-128-gan-long.yaml) and the VQGAN decoder's (configs/vqgan-128-ft-long.yaml).
# Its inputs sit in .gpu/ (git-ignored, so they travel with the call on a machine that has no ../shared):
# .gpu/cache/facerec (the dlib ResNet cache in fp16), .gpu/data/train (every second face of faces128/train, the
# first 2,550) and .gpu/data/val (64 faces).
# Results land in $OUT: log.txt, speed.md, and one tar per run (fp16 model/, log.csv, config, last val grids).
#   bash benchmarks/gpu_session.sh
#   SPEED=0 RUNS="irn-w025 vqgan" BUDGET_S=200 bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/gpu-out}
BUDGET_S=${BUDGET_S:-470}  # the trainings stop (and checkpoint) this many seconds after the script started
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 CLRFACE_CACHE=$PWD/.gpu/cache
log="$OUT/log.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())"
} > "$log" 2>&1

# SPEED=0 skips the speed row; RUNS picks the trainings: irn-w05, irn-w1, irn-w025 (IRN at that adv_weight) and
# vqgan (the decoder; a second run continues from the first one's checkpoint).
SPEED=${SPEED:-1}
RUNS=${RUNS:-"irn-w05 irn-w1 vqgan"}
if [ "$SPEED" = 1 ]; then
  crop=.gpu/data/val/$(ls .gpu/data/val | head -1)
  speed="python3 benchmarks/restore_speed.py --model default --device cuda --dtype float32 bfloat16 --aligned --photo $crop --threads 4 --reps 20 --batch 16"
  timeout 120 $speed --steps 5 --full-steps 10 --md "$OUT/speed.md" >> "$log" 2>&1
  timeout 60 $speed --steps --full-steps 1 --sampler euler --md "$OUT/speed.md" >> "$log" 2>&1
  echo "speed done at ${SECONDS}s" >> "$log"
fi

run_dir() {  # where each run writes (train.out_dir)
  case $1 in
    irn-w05) echo runs/irn-128-gan-long ;;
    vqgan) echo runs/vqgan-128-ft-long ;;
    *) echo "runs/irn-128-gan-long-${1#irn-}" ;;
  esac
}
minutes=$(python3 -c "print(round(max(1.0, ($BUDGET_S - $SECONDS - 15) / 60), 2))")
common="--set stage.train_dir=.gpu/data/train --set stage.val_dir=.gpu/data/val --set train.max_minutes=$minutes"
for r in $RUNS; do
  case $r in
    vqgan) args="vqgan --config configs/vqgan-128-ft-long.yaml" ;;
    irn-w05) args="irn --config configs/irn-128-gan-long.yaml" ;;
    irn-w1) args="irn --config configs/irn-128-gan-long.yaml --set stage.adv_weight=1.0" ;;
    irn-w025) args="irn --config configs/irn-128-gan-long.yaml --set stage.adv_weight=0.25" ;;
    *) echo "unknown run $r" >> "$log"; continue ;;
  esac
  python3 -m clrface train $args $common --set train.out_dir=$(run_dir $r) > "$OUT/$r.log" 2>&1 &
done
wait
echo "training done at ${SECONDS}s (max_minutes $minutes)" >> "$log"

pack() {  # run name: the exported model in fp16 (as shipped), logs and the last two validation grids
  local name=$1 run
  run=$(run_dir "$1")
  python3 - "$run/model/model.safetensors" <<'PY' >> "$log" 2>&1
import sys
from safetensors import safe_open
from safetensors.torch import save_file
path = sys.argv[1]
with safe_open(path, "pt") as f:
    meta = f.metadata()
    state = {k: f.get_tensor(k) for k in f.keys()}
save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path, metadata=meta)
PY
  tr '\r' '\n' < "$OUT/$name.log" | grep -v "it/s" > "$run/train.log"; rm -f "$OUT/$name.log"
  tar -cf "$OUT/$name.tar" -C "$run" model log.csv run_config.json train.log $(cd "$run" && ls val/*.png 2>/dev/null | tail -2)
}
for r in $RUNS; do pack "$r"; done
ls -la "$OUT" >> "$log"
