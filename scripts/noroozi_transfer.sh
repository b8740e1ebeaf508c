#!/usr/bin/env bash
# Knowledge transfer (Noroozi et al. 2018) on a GPU box:
#   Jigsaw++ on VGG16 -> conv features -> k-means (k=2000) -> pseudo-labels -> AlexNet learns them
#   -> linear probes per conv layer and full finetuning on labelled data.
#
# Usage:
#   scripts/noroozi_transfer.sh --data SRC --labelled SRC --eval-data SRC --out DIR [--gpus N]
#     --data       unlabelled images for the pretext task, clustering and retraining
#     --labelled   labelled images for the downstream evaluation (class subfolders, or fashion-mnist:DIR:train)
#     --eval-data  labelled evaluation images (default: the --labelled source's test split, if it has one)
#     --out        output folder; every stage writes one file or folder in it
#     --gpus       GPUs on this machine (default: all that torch sees); more than one runs the training
#                  stages under torchrun, and faiss k-means uses every GPU
# Every stage is resumable and skips work that is up to date: after a failure or a kill, run the same
# command again. Sizes can be changed through the environment (defaults are the paper's where it has one):
#   DEEP_ARCH=vgg16 SHALLOW_ARCH=alexnet IMAGE_SIZE=225 SHALLOW_SIZE=224 K=2000 PCA_DIM=auto (256 at K >= 129)
#   PRETEXT_EPOCHS=70 RETRAIN_EPOCHS=90 FINETUNE_EPOCHS=30 LINEAR_EPOCHS=30 BATCH=256 WORKERS=8
#   FEATURE_LAYER=conv5 POOL_SIZE=3 LR=0.01 LABELS_PER_CLASS= (empty: all labels) SSL="python -m ssl_cli"
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/lib.sh"
DATA="" LABELLED="" OUT="" EVAL_DATA="" GPUS=""
parse_args "$0" "data labelled out" "eval-data gpus" -- "$@"

DEEP_ARCH="${DEEP_ARCH:-vgg16}" SHALLOW_ARCH="${SHALLOW_ARCH:-alexnet}"
IMAGE_SIZE="${IMAGE_SIZE:-225}" SHALLOW_SIZE="${SHALLOW_SIZE:-224}"
K="${K:-2000}" PCA_DIM="${PCA_DIM:-auto}" FEATURE_LAYER="${FEATURE_LAYER:-conv5}" POOL_SIZE="${POOL_SIZE:-3}"
PRETEXT_EPOCHS="${PRETEXT_EPOCHS:-70}" RETRAIN_EPOCHS="${RETRAIN_EPOCHS:-90}"
FINETUNE_EPOCHS="${FINETUNE_EPOCHS:-30}" LINEAR_EPOCHS="${LINEAR_EPOCHS:-30}"
BATCH="${BATCH:-256}" WORKERS="${WORKERS:-8}" LR="${LR:-0.01}" LABELS_PER_CLASS="${LABELS_PER_CLASS:-}"
EXTRA_PRETEXT=(${EXTRA_PRETEXT:-})   # e.g. EXTRA_PRETEXT="--width 0.25" for a thin *_lowres arch
EXTRA_RETRAIN=(${EXTRA_RETRAIN:-})

mkdir -p "$OUT"
eval_args=()
[[ -n "$EVAL_DATA" ]] && eval_args=(--eval-data "$EVAL_DATA")
few=()
[[ -n "$LABELS_PER_CLASS" ]] && few=(--labels-per-class "$LABELS_PER_CLASS")
common=(--workers "$WORKERS" --no-progress)
# the papers' ImageNet recipe (SGD, cosine), not the small-image defaults of the tool (AdamW, one-cycle)
sgd=(--optimizer sgd --schedule cosine --weight-decay "${WEIGHT_DECAY:-5e-4}")

step "1/7 pretext: Jigsaw++ on $DEEP_ARCH"
launch_training pretext --task jigsawpp --arch "$DEEP_ARCH" --image-size "$IMAGE_SIZE" --data "$DATA" \
  --epochs "$PRETEXT_EPOCHS" --batch-size "$BATCH" --lr "$LR" "${sgd[@]}" --warmup-epochs 1 "${EXTRA_PRETEXT[@]}" \
  "${common[@]}" --out "$OUT/pretext.pt"

step "2/7 extract: $FEATURE_LAYER of the pretext network"
ssl_one extract --model "$OUT/pretext.pt" --data "$DATA" --layer "$FEATURE_LAYER" --pool avg --pool-size "$POOL_SIZE" \
  --batch-size "$BATCH" --dtype float16 "${common[@]}" --out "$OUT/features.h5"

step "3/7 cluster: k-means, k=$K (faiss on every GPU)"
ssl_one cluster --features "$OUT/features.h5" --k "$K" --pca-dim "$PCA_DIM" --no-progress --out "$OUT/clusters.h5"

step "4/7 pseudolabel"
ssl_one pseudolabel --clusters "$OUT/clusters.h5" --features "$OUT/features.h5" --no-progress --out "$OUT/labels.h5"

step "5/7 retrain: $SHALLOW_ARCH learns the cluster ids"
launch_training retrain --labels "$OUT/labels.h5" --data "$DATA" --arch "$SHALLOW_ARCH" --image-size "$SHALLOW_SIZE" \
  --sampling uniform --epochs "$RETRAIN_EPOCHS" --batch-size "$BATCH" --lr "$LR" "${sgd[@]}" "${EXTRA_RETRAIN[@]}" \
  "${common[@]}" --out "$OUT/student.pt"

step "6/7 finetune: linear probes on every conv layer of $SHALLOW_ARCH"
launch_training finetune --model "$OUT/student.pt" --data "$LABELLED" "${eval_args[@]}" --mode linear "${few[@]}" \
  --epochs "$LINEAR_EPOCHS" --batch-size "$BATCH" --lr 0.01 "${sgd[@]}" "${common[@]}" --out "$OUT/linear"

step "7/7 finetune: full finetuning of $SHALLOW_ARCH"
launch_training finetune --model "$OUT/student.pt" --data "$LABELLED" "${eval_args[@]}" --mode full "${few[@]}" \
  --epochs "$FINETUNE_EPOCHS" --batch-size "$BATCH" --lr "$LR" "${sgd[@]}" "${common[@]}" --out "$OUT/full"

step "done"
show_metrics "$OUT/linear/metrics.json" "$OUT/full/metrics.json"
