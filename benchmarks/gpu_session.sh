#!/usr/bin/env bash
# One lent-GPU session, run on the device machine from the repo root (README of the device tool): a GPU speed row,
# then three trainings side by side on the one GPU (issue 6, "sharper faces"): the IRN's adversarial fine-tune at
# adv_weight 0.5 and 1.0 (configs/irn-128-gan-long.yaml) and the VQGAN decoder's (configs/vqgan-128-ft-long.yaml).
# ../shared does not travel, so the call carries .gpu/ (git-ignored): .gpu/cache/facerec (the dlib ResNet cache in
# fp16), .gpu/data/train (every second face of faces128/train, the first 2,550) and .gpu/data/val (64 faces).
# Results land in $OUT: log.txt, speed.md, and one tar per run (fp16 model/, log.csv, config, last val grids).
set -u
OUT=${OUT:-/tmp/gpu-out}
BUDGET_S=${BUDGET_S:-470}  # the trainings stop (and checkpoint) this many seconds after the script started
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 CLRFACE_CACHE=$PWD/.gpu/cache
log="$OUT/log.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())"
} > "$log" 2>&1

crop=.gpu/data/val/$(ls .gpu/data/val | head -1)
speed="python3 benchmarks/restore_speed.py --model default --device cuda --dtype float32 bfloat16 --aligned --photo $crop --threads 4 --reps 20 --batch 16"
timeout 120 $speed --steps 5 --full-steps 10 --md "$OUT/speed.md" >> "$log" 2>&1
timeout 60 $speed --steps --full-steps 1 --sampler euler --md "$OUT/speed.md" >> "$log" 2>&1
echo "speed done at ${SECONDS}s" >> "$log"

minutes=$(python3 -c "print(round(max(1.0, ($BUDGET_S - $SECONDS - 15) / 60), 2))")
common="--set stage.train_dir=.gpu/data/train --set stage.val_dir=.gpu/data/val --set train.max_minutes=$minutes"
python3 -m clrface train irn --config configs/irn-128-gan-long.yaml $common > "$OUT/irn-w05.log" 2>&1 &
python3 -m clrface train irn --config configs/irn-128-gan-long.yaml $common --set stage.adv_weight=1.0 \
  --set train.out_dir=runs/irn-128-gan-long-w1 > "$OUT/irn-w1.log" 2>&1 &
python3 -m clrface train vqgan --config configs/vqgan-128-ft-long.yaml $common > "$OUT/vqgan.log" 2>&1 &
wait
echo "training done at ${SECONDS}s (max_minutes $minutes)" >> "$log"

pack() {  # run dir, tar name: the exported model in fp16 (as shipped), logs and the last two validation grids
  local run=$1 name=$2
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
  tr -d '\r' < "$OUT/$name.log" | grep -v "it/s\]$" > "$run/train.log"; rm -f "$OUT/$name.log"
  tar -cf "$OUT/$name.tar" -C "$run" model log.csv run_config.json train.log $(cd "$run" && ls val/*.png 2>/dev/null | tail -2)
}
pack runs/irn-128-gan-long irn-w05
pack runs/irn-128-gan-long-w1 irn-w1
pack runs/vqgan-128-ft-long vqgan
ls -la "$OUT" >> "$log"
