#!/usr/bin/env bash
# The synthetic-dataset experiments quoted in README.md, in three stages:
#   m2f    generate the dataset, evaluate the untrained model, train Mask2Former R50 from scratch
#   eco    fixed-exit table of that model, ECO-M2F step A, its fixed-exit table, step B, step C + gated
#          evaluation for each beta (the trade-off sweep)
#   bench  throughput of Mask2Former Swin-T, ours (official float32 pixel decoder, and bf16 pixel
#          decoder) vs transformers', 1024x1024
#   train-impl  train the R50 model IMPL_ITERS iterations with each deformable-attention
#          implementation (pytorch reference, triton kernels): time per iteration and losses
#   all    bench, m2f and eco in turn
# Usage: scripts/synthetic_experiments.sh STAGE [OUT_DIR]
# Sizes come from the environment: NTRAIN NVAL ITERS STEPA_ITERS BETAS, CONFIG / ECO_CONFIG, EXTRA (KEY VALUE ...).
# TRAIN_SECONDS / STEPA_SECONDS bound the wall time of training: a run stopped by the bound
# continues from its last periodic checkpoint (SOLVER.CHECKPOINT_PERIOD), whose iteration is printed.
set -euo pipefail
stage=${1:?usage: $0 m2f|eco|bench|train-impl|all [OUT_DIR]}
out=${2:-output/synthetic_experiments}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-$(command -v python || command -v python3)}
cfg=${CONFIG:-configs/synthetic/maskformer2_R50.yaml}
eco_cfg=${ECO_CONFIG:-configs/synthetic/eco_m2f_R50.yaml}
NTRAIN=${NTRAIN:-1000}; NVAL=${NVAL:-100}; SIZE=${SIZE:-256}
ITERS=${ITERS:-1500}; STEPA_ITERS=${STEPA_ITERS:-600}; BETAS=${BETAS:-"0.002 0.01"}
TRAIN_SECONDS=${TRAIN_SECONDS:-0}; STEPA_SECONDS=${STEPA_SECONDS:-0}
read -r -a extra <<< "${EXTRA:-}"
export DETECTRON2_DATASETS=${DETECTRON2_DATASETS:-$out/datasets}
mkdir -p "$out"
cd "$here"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

# train SECONDS OUT_DIR ARGS...: train_net.py, stopped after SECONDS (0 = no bound); then
# OUT_DIR/model_trained.pth is the final checkpoint, or the last periodic one if the bound hit.
train() {
  local seconds=$1 dir=$2; shift 2
  if [ "$seconds" -gt 0 ]; then
    timeout -s TERM "$seconds" "$py" train_net.py "$@" OUTPUT_DIR "$dir" || stamp "training stopped by the ${seconds} s bound"
  else
    "$py" train_net.py "$@" OUTPUT_DIR "$dir"
  fi
  local ckpt="$dir/model_final.pth"
  [ -f "$ckpt" ] || ckpt=$(ls "$dir"/model_[0-9]*.pth 2>/dev/null | sort | tail -n 1)
  [ -n "$ckpt" ] || { echo "no checkpoint in $dir" >&2; exit 1; }
  cp "$ckpt" "$dir/model_trained.pth"
  stamp "trained weights: $ckpt"
}

make_dataset() {
  if [ ! -f "$DETECTRON2_DATASETS/synthetic/synthetic_info.json" ]; then
    stamp "generating the synthetic dataset"
    "$py" datasets/prepare_synthetic.py --root "$DETECTRON2_DATASETS/synthetic" \
      --num-train "$NTRAIN" --num-val "$NVAL" --image-size "$SIZE"
  fi
}

case "$stage" in
all)
  for s in bench m2f eco; do bash "$here/scripts/synthetic_experiments.sh" "$s" "$out"; done
  ;;
m2f)
  make_dataset
  stamp "untrained model"
  "$py" scripts/eval_exits.py --config-file "$cfg" --random-init --exits 0 --title "untrained (random init)" \
    --json "$out/untrained.json" OUTPUT_DIR "$out/untrained" "${extra[@]}"
  stamp "training Mask2Former from scratch, $ITERS iterations"
  train "$TRAIN_SECONDS" "$out/m2f" --config-file "$cfg" SOLVER.MAX_ITER "$ITERS" "${extra[@]}"
  "$py" scripts/eval_exits.py --config-file "$cfg" --weights "$out/m2f/model_trained.pth" --exits 0 \
    --title "trained Mask2Former" --json "$out/trained.json" OUTPUT_DIR "$out/trained" "${extra[@]}"
  stamp "done"
  ;;
eco)
  stamp "baseline (Mask2Former without step A) at fixed exits"
  "$py" scripts/eval_exits.py --config-file "$cfg" --weights "$out/m2f/model_trained.pth" --exits "2 3 4 5 6" \
    --title "baseline M2F, truncated encoder" --json "$out/baseline_exits.json" OUTPUT_DIR "$out/baseline_exits" "${extra[@]}"
  stamp "step A: weighted stochastic depth, $STEPA_ITERS iterations"
  train "$STEPA_SECONDS" "$out/stepA" --config-file "$eco_cfg" MODEL.WEIGHTS "$out/m2f/model_trained.pth" \
    SOLVER.MAX_ITER "$STEPA_ITERS" "${extra[@]}"
  "$py" scripts/eval_exits.py --config-file "$eco_cfg" --weights "$out/stepA/model_trained.pth" --exits "2 3 4 5 6" \
    --title "ECO-M2F after step A, fixed exits" --json "$out/stepA_exits.json" OUTPUT_DIR "$out/stepA_exits" "${extra[@]}"
  stamp "step B: derived dataset"
  scripts/derive_dataset.sh "$eco_cfg" "$out/stepA/model_trained.pth" "$out/derived" "${extra[@]}"
  stamp "step C + gated evaluation for betas: $BETAS"
  scripts/sweep_beta.sh "$eco_cfg" "$out/derived" "$BETAS" --no-fixed "${extra[@]}"
  stamp "done"
  ;;
bench)
  "$py" scripts/benchmark.py --warmup "${BENCH_WARMUP:-10}" --iters "${BENCH_ITERS:-30}" --config-file configs/coco/panoptic-segmentation/swin/maskformer2_swin_tiny_bs16_50ep.yaml \
    --size 1024 1024 --batch-sizes 1 8 --dtypes fp32 bf16 --compare-hf --json "$out/benchmark.json" \
    --variant "bf16 pixel decoder" MODEL.SEM_SEG_HEAD.PIXEL_DECODER_FP32 False
  ;;
train-impl)
  make_dataset
  for impl in pytorch triton; do
    stamp "training ${IMPL_ITERS:-100} iterations, MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL $impl"
    "$py" train_net.py --config-file "$cfg" SOLVER.MAX_ITER "${IMPL_ITERS:-100}" SOLVER.CHECKPOINT_PERIOD 1000000 \
      DATASETS.TEST "()" SEED 0 MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL "$impl" OUTPUT_DIR "$out/impl_$impl" "${extra[@]}"
  done
  "$py" - "$out" <<'PY'
import json, statistics, sys
for impl in ("pytorch", "triton"):
    rows = [json.loads(l) for l in open(f"{sys.argv[1]}/impl_{impl}/metrics.json") if '"total_loss"' in l]
    late = rows[len(rows) // 2:]
    print(f"{impl:>8}: {statistics.median(r['time'] for r in late):.3f} s/iter (median, second half); "
          f"total_loss first {rows[0]['total_loss']:.2f}, last {rows[-1]['total_loss']:.2f}")
PY
  ;;
*)
  echo "unknown stage '$stage' (m2f, eco, bench, train-impl or all)" >&2; exit 2 ;;
esac
