#!/usr/bin/env bash
# The synthetic-dataset experiments quoted in README.md, in three stages:
#   m2f    generate the dataset, evaluate the untrained model, train Mask2Former R50 from scratch
#   eco    fixed-exit table of that model, ECO-M2F step A, its fixed-exit table, step B, step C + gated
#          evaluation for each beta (the trade-off sweep)
#   bench  throughput of Mask2Former Swin-T, ours (official float32 pixel decoder, and bf16 pixel
#          decoder) vs transformers', 1024x1024
#   train-impl  train the R50 model IMPL_ITERS iterations with each deformable-attention
#          implementation (pytorch reference, triton kernels): time per iteration and losses
#   trends the ECO-M2F trends on the busier PRESET (default hard) dataset, every step kept once
#          done and resumed after a kill (rerun the same command): parent Mask2Former, fixed exits
#          of the parent, step A with WSD (alpha linear) and USD (alpha uniform) and their fixed
#          exits, step B on WSD, best exit by image complexity, the beta sweep (BETAS, at least five
#          for the trend), K_user 5 and 4 and the three other gate losses at TREND_BETA, and the
#          gated model's wall time at batch 8 and 1 beside fixed exits 2 and 6 (real images, bf16);
#          then all of it as tables (scripts/trends_report.py: trends_report.{md,json,png})
#   all    bench, m2f and eco in turn
# Usage: scripts/synthetic_experiments.sh STAGE [OUT_DIR]
# Sizes come from the environment: NTRAIN NVAL SIZE PRESET GEN_WORKERS (processes drawing the data) ITERS STEPA_ITERS BETAS TREND_BETA CKPT
# WALL_BATCHES WALL_DTYPE TREND_KS TREND_LOSSES, PARALLEL=1 (trends: the two step-A trainings at once,
# then the K_user and gate-loss sweeps at once; the wall-time benchmarks always run alone),
# CONFIG / ECO_CONFIG, EXTRA (KEY VALUE ...).
# TRAIN_SECONDS / STEPA_SECONDS bound the wall time of training: a run stopped by the bound
# continues from its last periodic checkpoint (SOLVER.CHECKPOINT_PERIOD), whose iteration is printed.
set -euo pipefail
stage=${1:?usage: $0 m2f|eco|bench|train-impl|trends|all [OUT_DIR]}
out=${2:-output/synthetic_experiments}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-$(command -v python || command -v python3)}
cfg=${CONFIG:-configs/synthetic/maskformer2_R50.yaml}
eco_cfg=${ECO_CONFIG:-configs/synthetic/eco_m2f_R50.yaml}
NTRAIN=${NTRAIN:-1000}; NVAL=${NVAL:-100}; SIZE=${SIZE:-256}
preset_given=${PRESET:-}; betas_given=${BETAS:-}  # the trends stage has defaults of its own
ITERS=${ITERS:-1500}; STEPA_ITERS=${STEPA_ITERS:-600}; BETAS=${BETAS:-"0.002 0.01"}; PRESET=${PRESET:-standard}
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
    stamp "generating the synthetic dataset (preset $PRESET)"
    "$py" datasets/prepare_synthetic.py --root "$DETECTRON2_DATASETS/synthetic" \
      --num-train "$NTRAIN" --num-val "$NVAL" --image-size "$SIZE" --preset "$PRESET" --workers "${GEN_WORKERS:-$(nproc)}"
  fi
}

# trained SECONDS OUT_DIR ARGS...: train unless OUT_DIR holds a finished run (model_final.pth);
# a run killed or stopped by the bound continues from OUT_DIR/last.ckpt
trained() {
  local seconds=$1 dir=$2; shift 2
  if [ -f "$dir/model_final.pth" ]; then
    cp "$dir/model_final.pth" "$dir/model_trained.pth"; stamp "kept the finished run in $dir"; return
  fi
  local resume=(); [ -f "$dir/last.ckpt" ] && resume=(--resume) && stamp "resuming $dir/last.ckpt"
  train "$seconds" "$dir" "${resume[@]}" "$@"
}

# exits_table WEIGHTS CONFIG NAME TITLE: the fixed-exit table, once
exits_table() {
  [ -f "$out/$3.json" ] && { stamp "kept $out/$3.json"; return; }
  "$py" scripts/eval_exits.py --config-file "$2" --weights "$1" --exits "2 3 4 5 6" --title "$4" \
    --json "$out/$3.json" OUTPUT_DIR "$out/$3" "${extra[@]}"
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
trends)
  PRESET=${preset_given:-hard}
  BETAS=${betas_given:-"0.0005 0.001 0.002 0.005 0.01 0.02"}; TREND_BETA=${TREND_BETA:-0.002}
  ckpt=(SOLVER.CHECKPOINT_PERIOD "${CKPT:-200}")
  make_dataset
  stamp "parent Mask2Former: $ITERS iterations"
  trained "$TRAIN_SECONDS" "$out/m2f" --config-file "$cfg" SOLVER.MAX_ITER "$ITERS" "${ckpt[@]}" "${extra[@]}"
  [ -f "$out/m2f/model_final.pth" ] || { stamp "the parent is not finished: rerun to continue"; exit 3; }
  exits_table "$out/m2f/model_trained.pth" "$cfg" baseline_exits "baseline M2F, truncated encoder"
  step_a() {  # step_a ALPHA NAME: train step A (kept when finished)
    stamp "step A, $2 (MODEL.ECO.ALPHA $1): $STEPA_ITERS iterations"
    trained "$STEPA_SECONDS" "$out/stepA_$2" --config-file "$eco_cfg" MODEL.WEIGHTS "$out/m2f/model_trained.pth" \
      MODEL.ECO.ALPHA "$1" SOLVER.MAX_ITER "$STEPA_ITERS" "${ckpt[@]}" "${extra[@]}"
  }
  if [ "${PARALLEL:-0}" = 1 ]; then
    # both from the same parent at once (the GPU has room beside one host-bound training);
    # each one's output goes to its folder's stdout.log
    pids=()
    for name in wsd usd; do
      alpha=$([ "$name" = wsd ] && echo linear || echo uniform)
      mkdir -p "$out/stepA_$name"
      step_a "$alpha" "$name" > "$out/stepA_$name/stdout.log" 2>&1 & pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || stamp "a step-A run stopped (see $out/stepA_*/stdout.log)"; done
  fi
  for name in wsd usd; do
    alpha=$([ "$name" = wsd ] && echo linear || echo uniform)
    [ "${PARALLEL:-0}" = 1 ] || step_a "$alpha" "$name"
    [ -f "$out/stepA_$name/model_final.pth" ] || { stamp "step A ($name) is not finished: rerun to continue"; exit 3; }
    exits_table "$out/stepA_$name/model_trained.pth" "$eco_cfg" "stepA_${name}_exits" "ECO-M2F step A ($name), fixed exits"
  done
  stamp "step B on the WSD model (resumes its records)"
  scripts/derive_dataset.sh "$eco_cfg" "$out/stepA_wsd/model_trained.pth" "$out/derived" "${extra[@]}"
  "$py" scripts/exit_complexity.py --derived "$out/derived" --complexity "$DETECTRON2_DATASETS/synthetic/complexity_train.json" \
    --field objects --field occluded_fraction --field boundary_fraction --json "$out/exit_complexity.json" | tee "$out/exit_complexity.txt"
  stamp "trade-off sweep over betas $BETAS (with the fixed exits)"
  [ -f "$out/derived/sweep/sweep.csv" ] || scripts/sweep_beta.sh "$eco_cfg" "$out/derived" "$BETAS" "${extra[@]}"
  k_user() {  # k_user K: the sweep at TREND_BETA with the user budget K
    stamp "K_user $1 at beta $TREND_BETA"
    [ -f "$out/derived/sweep_k$1/sweep.csv" ] || scripts/sweep_beta.sh "$eco_cfg" "$out/derived" "$TREND_BETA" --no-fixed \
      --k-user "$1" --output-dir "$out/derived/sweep_k$1" "${extra[@]}"
  }
  gate_loss() {  # gate_loss LOSS: the sweep at TREND_BETA with another gate loss
    stamp "gate loss $1 at beta $TREND_BETA"
    [ -f "$out/derived/sweep_$1/sweep.csv" ] || scripts/sweep_beta.sh "$eco_cfg" "$out/derived" "$TREND_BETA" --no-fixed \
      --output-dir "$out/derived/sweep_$1" MODEL.ECO.GATE.LOSS "$1" "${extra[@]}"
  }
  if [ "${PARALLEL:-0}" = 1 ]; then  # all at once, each one's output in its sweep folder's stdout.log
    pids=()
    for k in ${TREND_KS:-5 4}; do mkdir -p "$out/derived/sweep_k$k"; k_user "$k" > "$out/derived/sweep_k$k/stdout.log" 2>&1 & pids+=($!); done
    for loss in ${TREND_LOSSES:-u-CE soft-CE soft-MSE}; do
      mkdir -p "$out/derived/sweep_$loss"; gate_loss "$loss" > "$out/derived/sweep_$loss/stdout.log" 2>&1 & pids+=($!)
    done
    failed=0; for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    [ "$failed" = 0 ] || { stamp "a K_user or gate-loss sweep failed (see $out/derived/sweep_*/stdout.log)"; exit 1; }
  else
    for k in ${TREND_KS:-5 4}; do k_user "$k"; done
    for loss in ${TREND_LOSSES:-u-CE soft-CE soft-MSE}; do gate_loss "$loss"; done
  fi
  gate_cfg="$out/derived/gate_beta${TREND_BETA}_k6/config.yaml"
  if [ -f "$gate_cfg" ]; then
    stamp "wall time of the gated model (beta $TREND_BETA) and of fixed exits 2 and 6, real images"
    for e in gated 2 6; do
      [ -f "$out/wall_time_$e.json" ] && { stamp "kept $out/wall_time_$e.json"; continue; }
      exit_arg=(); [ "$e" = gated ] || exit_arg=(--exit "$e")
      "$py" scripts/benchmark.py --config-file "$gate_cfg" --real-images "${exit_arg[@]}" --batch-sizes ${WALL_BATCHES:-8 1} \
        --dtypes "${WALL_DTYPE:-bf16}" \
        --json "$out/wall_time_$e.json" "${extra[@]}"
    done
  else
    stamp "no gate config $gate_cfg: TREND_BETA must be one of BETAS ($BETAS)"
  fi
  stamp "the tables: $out/trends_report.md"
  "$py" scripts/trends_report.py "$out" --trend-beta "$TREND_BETA"
  stamp "done"
  ;;
*)
  echo "unknown stage '$stage' (m2f, eco, bench, train-impl, trends or all)" >&2; exit 2 ;;
esac
