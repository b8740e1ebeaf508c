#!/usr/bin/env bash
# Self-training (Zoph et al. 2020; Noisy Student) on a GPU box:
#   [optional] finetune a pretrained checkpoint on the labelled images -> the first teacher
#   -> ROUNDS rounds of: the teacher labels the unlabelled images, a noised student learns
#      labelled + confident pseudo-labelled images, the student becomes the next teacher.
#
# Usage:
#   scripts/self_training.sh --labelled SRC --unlabelled SRC --out DIR [--eval-data SRC] [--init CKPT] [--gpus N]
#     --labelled    labelled images (class subfolders, or fashion-mnist:DIR:train)
#     --unlabelled  images the teacher labels
#     --eval-data   labelled evaluation images (default: the --labelled source's test split, if it has one)
#     --init        a checkpoint (e.g. noroozi_transfer.sh's student.pt) finetuned into the first teacher;
#                   without it, round 0 trains the first teacher from scratch on the labelled images
#     --out         output folder
#     --gpus        GPUs (default: all that torch sees); more than one runs the teacher's finetuning under
#                   torchrun. `ssl self-train` itself runs in one process on one GPU.
# Re-running the same command after a failure or a kill skips finished rounds and resumes the rest.
# Environment: ARCH=resnet50 STUDENT_ARCH= (default ARCH) ROUNDS=3 LABELS_PER_CLASS= (empty: all)
#   THRESHOLD=0.3 BALANCE= RATIO=3 WEIGHT=1 SOFT=0 TEMPERATURE=1 EPOCHS=60 INIT_EPOCHS=30 IMAGE_SIZE=224
#   BATCH=128 WORKERS=8 LR=0.1 EXTRA= (more self-train flags) SSL="python -m ssl_cli"
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/lib.sh"
LABELLED="" UNLABELLED="" OUT="" EVAL_DATA="" INIT="" GPUS=""
parse_args "$0" "labelled unlabelled out" "eval-data init gpus" -- "$@"

ARCH="${ARCH:-resnet50}" STUDENT_ARCH="${STUDENT_ARCH:-}" ROUNDS="${ROUNDS:-3}"
LABELS_PER_CLASS="${LABELS_PER_CLASS:-}" THRESHOLD="${THRESHOLD:-0.3}" BALANCE="${BALANCE:-}"
RATIO="${RATIO:-3}" WEIGHT="${WEIGHT:-1}" SOFT="${SOFT:-0}" TEMPERATURE="${TEMPERATURE:-1}"
EPOCHS="${EPOCHS:-60}" INIT_EPOCHS="${INIT_EPOCHS:-30}" IMAGE_SIZE="${IMAGE_SIZE:-224}"
BATCH="${BATCH:-128}" WORKERS="${WORKERS:-8}" LR="${LR:-0.1}"
EXTRA=(${EXTRA:-})

mkdir -p "$OUT"
eval_args=()
[[ -n "$EVAL_DATA" ]] && eval_args=(--eval-data "$EVAL_DATA")
few=()
[[ -n "$LABELS_PER_CLASS" ]] && few=(--labels-per-class "$LABELS_PER_CLASS")
policy=(--threshold "$THRESHOLD" --unlabelled-ratio "$RATIO" --unlabelled-weight "$WEIGHT")
[[ -n "$BALANCE" ]] && policy+=(--balance "$BALANCE")
[[ "$SOFT" == 1 ]] && policy+=(--soft --temperature "$TEMPERATURE")
[[ -n "$STUDENT_ARCH" ]] && policy+=(--student-arch "$STUDENT_ARCH")
common=(--workers "$WORKERS" --no-progress)
# the papers' ImageNet recipe (SGD, cosine), not the small-image defaults of the tool (AdamW, one-cycle)
sgd=(--optimizer sgd --schedule cosine --weight-decay "${WEIGHT_DECAY:-1e-4}")

teacher=()
if [[ -n "$INIT" ]]; then
  step "1/2 finetune $INIT on the labelled images: the first teacher"
  launch_training finetune --model "$INIT" --data "$LABELLED" "${eval_args[@]}" --mode full "${few[@]}" \
    --epochs "$INIT_EPOCHS" --batch-size "$BATCH" --lr "$LR" "${sgd[@]}" "${common[@]}" --out "$OUT/teacher"
  teacher=(--teacher "$OUT/teacher/finetuned.pt")
  arch=()
else
  step "1/2 no --init: round 0 trains $ARCH on the labelled images"
  arch=(--arch "$ARCH" --image-size "$IMAGE_SIZE")
fi

step "2/2 self-train: $ROUNDS rounds"
ssl_one self-train --labelled "$LABELLED" --unlabelled "$UNLABELLED" "${eval_args[@]}" "${few[@]}" \
  "${teacher[@]}" "${arch[@]}" --rounds "$ROUNDS" "${policy[@]}" --epochs "$EPOCHS" --batch-size "$BATCH" \
  --lr "$LR" "${sgd[@]}" --warmup-epochs 1 "${EXTRA[@]}" "${common[@]}" --out "$OUT/rounds"

step "done: $OUT/rounds/summary.json"
