#!/usr/bin/env bash
# Trains side by side on one CUDA GPU for a fixed wall-clock budget, run from the repository root. Faces stay on the
# GPU as uint8 and are degraded there (data/degradation.py, data/jpeg.py), so each run is bound by the GPU, not by
# one CPU core. Runs (RUNS picks a subset):
#   irn       the default IRN continued (configs/irn-128-gpu.yaml)
#   irn-m     a 3.65 M IRN from scratch (configs/irn-128-wide.yaml at channels 48/96/192)
#   irn-l     a 6.5 M IRN from scratch (configs/irn-128-wide.yaml)
#   irn-bl, irn-m-bl  irn and irn-m with bilinear interpolation on the way up (model.upsample), which draws no 4 px grid
#   irn-blur, irn-bl-blur  irn and irn-bl with the identity and perceptual terms seeing both faces through a 1 px blur
#             (stage.id_blur), so identity comes from the coarser bands, not from texture the recogniser reads as it
#   irn-deep  the deeper 2.8 M IRN (blocks 1/2/8) continued from the CPU runs at identity weight 2, PatchGAN 0.5
#             (configs/irn-128-gpu.yaml; its start weights carried as .gpu/init/irn-deep: gpu_data.py --init)
#   extreme   the x8 model continued with facerec-perceptual + PatchGAN beside Eq. 11 (configs/irn-128-extreme-gpu.yaml)
#   prior     the latent prior continued (configs/prior-128-x3.yaml)
#   prior-st  the same, also trained on the sampler's start states (configs/prior-128-x3-start.yaml)
#   prior-st50  prior-st with half of each batch from the start states
#   irn-jit, extreme-jit  irn and extreme with the recogniser's terms on jittered chips (stage.id_jitter)
#   decoder, decoder-hi  the VQGAN decoder, encoder and codebook frozen (configs/vqgan-128-ft-x3.yaml), at PatchGAN
#             weights 1.5 and 4 against the detail the decoder still loses (val lapvar_ratio)
#   decoder-tex, decoder-tex-hi  the same decoder fine-tune with the local Laplacian energy term
#             (stage.detail_energy_weight 2 and 6), which pays for texture of the right strength
#   distill   the one-step prior distilled from TEACHER (a model folder, e.g. made by clrface pack and copied along)
# Inputs sit in .gpu/ (git-ignored; made by benchmarks/gpu_data.py): a zip of training faces and 64 validation
# faces, unpacked first, the face-recognition network's fp16 cache, and the start weights of runs that need them
# (.gpu/init/NAME, from gpu_data.py --init NAME=DIR; a run whose start weights are missing is not started). Every run gets SIGTERM at the deadline,
# checkpoints and exports; results land in $OUT: log.txt and one tar per run (model/ in fp16 as shipped, log.csv,
# run_config.json, train.log, the last validation grid).
#   python benchmarks/gpu_data.py --budget-mib 18 --init irn-deep=runs/irn-b128-deep-id2a05/model
#   BUDGET_S=555 bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-runs/gpu-out}
BUDGET_S=${BUDGET_S:-560}  # runs are stopped this many seconds after the script started, less the packing time
RUNS=${RUNS:-"irn extreme prior-st decoder"}
EXTRA=${EXTRA:-}  # more --set overrides for every run (a CPU dry run: EXTRA="--set train.batch_size=4 ...")
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 CLRFACE_CACHE=$PWD/.gpu/cache
log="$OUT/log.txt"
python3 -m zipfile -e .gpu/faces.zip .gpu/data
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())"
  echo "train faces: $(ls .gpu/data/train | wc -l)"
} > "$log" 2>&1

data="--set stage.train_dir=.gpu/data/train --set stage.val_dir=.gpu/data/val --set train.threads=2"
prior_st="prior --config configs/prior-128-x3-start.yaml --set train.batch_size=256 --set stage.lr=2.0e-4
          --set train.steps=100000 --set train.ckpt_every=1000 --set stage.degrade_steps=8"
decoder="vqgan --config configs/vqgan-128-ft-x3.yaml --set stage.lr=1.0e-4 --set train.batch_size=32
         --set train.steps=100000 --set train.max_minutes=0 --set train.val_every=500 --set train.ckpt_every=1000"
declare -A ARGS=(
  [irn]="irn --config configs/irn-128-gpu.yaml"
  [irn-m]="irn --config configs/irn-128-wide.yaml --set model.channels=[48,96,192] --set train.out_dir=runs/irn-128-wide-m"
  [irn-l]="irn --config configs/irn-128-wide.yaml"
  [irn-bl]="irn --config configs/irn-128-gpu.yaml --set model.upsample=bilinear --set train.out_dir=runs/irn-128-gpu-bl"
  [irn-m-bl]="irn --config configs/irn-128-wide.yaml --set model.channels=[48,96,192] --set model.upsample=bilinear
              --set train.out_dir=runs/irn-128-wide-m-bl"
  [irn-blur]="irn --config configs/irn-128-gpu.yaml --set stage.id_blur=1.0 --set train.out_dir=runs/irn-128-gpu-blur"
  [irn-bl-blur]="irn --config configs/irn-128-gpu.yaml --set model.upsample=bilinear --set stage.id_blur=1.0
                 --set train.out_dir=runs/irn-128-gpu-bl-blur"
  [irn-deep]="irn --config configs/irn-128-gpu.yaml --set model.blocks=[1,2,8] --set stage.init_from=.gpu/init/irn-deep
              --set stage.identity_weight=2 --set stage.disc_warmup=200 --set train.out_dir=runs/irn-128-gpu-deep"
  [extreme]="irn --config configs/irn-128-extreme-gpu.yaml"
  [prior]="prior --config configs/prior-128-x3.yaml --set train.batch_size=256 --set stage.lr=2.0e-4
           --set train.steps=100000 --set train.ckpt_every=1000 --set stage.degrade_steps=8 --set train.out_dir=runs/prior-gpu"
  [prior-st]="$prior_st --set train.out_dir=runs/prior-gpu-start"
  [prior-st50]="$prior_st --set stage.start_prob=0.5 --set train.out_dir=runs/prior-gpu-start50"
  [irn-jit]="irn --config configs/irn-128-gpu.yaml --set stage.id_jitter=0.03 --set train.out_dir=runs/irn-128-gpu-jit"
  [extreme-jit]="irn --config configs/irn-128-extreme-gpu.yaml --set stage.id_jitter=0.03 --set train.out_dir=runs/irn-128-extreme-jit"
  [decoder]="$decoder --set stage.adv_weight=1.5 --set train.out_dir=runs/vqgan-gpu-adv15"
  [decoder-hi]="$decoder --set stage.adv_weight=4.0 --set train.out_dir=runs/vqgan-gpu-adv4"
  [decoder-tex]="$decoder --set stage.detail_energy_weight=2.0 --set stage.detail_window=4
                 --set train.out_dir=runs/vqgan-gpu-tex2"
  [decoder-tex-hi]="$decoder --set stage.detail_energy_weight=6.0 --set stage.detail_window=4
                    --set train.out_dir=runs/vqgan-gpu-tex6"
  [distill]="distill --config configs/distill-128.yaml --set stage.model=${TEACHER:-runs/pack-teacher}
             --set stage.pairs=8192 --set stage.traj_batch=256 --set stage.lr=1.0e-4 --set train.batch_size=256
             --set train.steps=100000 --set train.val_every=500 --set train.ckpt_every=1000
             --set train.out_dir=runs/distill-gpu"
)
declare -A PIDS DIRS
for r in $RUNS; do
  args=${ARGS[$r]}
  DIRS[$r]=$(python3 - $args <<'PY'
import sys
from pathlib import Path
from clrface.train.run import load_config
a = sys.argv[1:]
sets = [a[i + 1] for i, x in enumerate(a) if x == "--set"]
cfg = load_config(a[a.index("--config") + 1], sets)
start = cfg.get("stage", {}).get("init_from")
print("" if start and not Path(start).is_dir() else cfg["train"]["out_dir"])
PY
)
  if [ -z "${DIRS[$r]}" ]; then echo "$r: not started, its start weights are missing (gpu_data.py --init)" >> "$log"; continue; fi
  python3 -m clrface train $args $data $EXTRA > "$OUT/$r.log" 2>&1 &
  PIDS[$r]=$!
done
sleep 60
[ -n "$EXTRA" ] || nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv >> "$log" 2>&1
deadline=$((BUDGET_S - 40))
alive() { for p in ${PIDS[@]}; do kill -0 $p 2>/dev/null && return 0; done; return 1; }
while [ $SECONDS -lt $deadline ] && alive; do sleep 5; done
kill -TERM ${PIDS[@]} 2>/dev/null
wait
echo "training stopped at ${SECONDS}s" >> "$log"

for r in $RUNS; do  # the exported model in fp16 (as shipped), logs and the last validation grid
  run=${DIRS[$r]}
  [ -n "$run" ] || continue  # not started
  mkdir -p "$run"  # a run that failed before making its folder keeps its log too
  tr '\r' '\n' < "$OUT/$r.log" | grep -v "it/s\]$" > "$run/train.log"
  tail -3 "$run/train.log" | sed "s/^/$r: /" >> "$log"
  rm -f "$OUT/$r.log"
  [ -f "$run/model/model.safetensors" ] || { echo "$r: no model" >> "$log"; tail -40 "$run/train.log" >> "$log"; continue; }
  python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from gpu_data import save_fp16; save_fp16(sys.argv[1], sys.argv[1])" \
    "$run/model/model.safetensors" >> "$log" 2>&1
  tar -cf "$OUT/$r.tar" -C "$run" model log.csv run_config.json train.log $(cd "$run" && ls val/*.png 2>/dev/null | tail -1)
done
ls -la "$OUT" >> "$log"
