#!/usr/bin/env bash
# Two machines simulated on this one: every stage is started as two torchrun "nodes"
# (`--nnodes 2 --node-rank 0|1`, one CPU process each, gloo, rendezvous on 127.0.0.1), the way
# two real machines would start it, sharing OUT as they would share a filesystem.
#   scripts/multinode-demo.sh [OUT]        (default runs/multinode; about a minute on 2 cores)
# Toy images -> rotation pretext (1 epoch, DDP across the nodes) -> features (each node extracts
# half) -> torch k-means (sums all-reduced across the nodes). On real machines run the same
# torchrun line on each with its own --node-rank and --master-addr set to node 0's address.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$([[ -x "$ROOT/.venv/bin/python" ]] && echo "$ROOT/.venv/bin/python" || echo python)}"
OUT="${1:-runs/multinode}"
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# on_two_nodes ARGS...: `ssl ARGS` on node 0 and node 1 at once; fails if either does.
on_two_nodes() {
  local port pids=() rank status=0
  port="$($PYTHON -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  for rank in 0 1; do
    $PYTHON -m torch.distributed.run --nnodes 2 --nproc-per-node 1 --node-rank "$rank" \
        --master-addr 127.0.0.1 --master-port "$port" -m ssl_cli "$@" > "$OUT/node$rank.log" 2>&1 &
    pids+=("$!")
  done
  for rank in 0 1; do wait "${pids[$rank]}" || status=$?; done
  cat "$OUT/node0.log"  # rank 0 prints the summary; node1.log holds the other rank's lines
  return "$status"
}

$PYTHON -m ssl_cli toy-data "$OUT/toy" --n 96 --classes 4 --size 32 --seed 0
on_two_nodes pretext --task rotation --arch alexnet_lowres --width 0.25 --image-size 32 --batch-size 16 \
    --epochs 1 --workers 0 --device cpu --no-progress --data "$OUT/toy" --out "$OUT/pretext.pt"
on_two_nodes extract --model "$OUT/pretext.pt" --data "$OUT/toy" --batch-size 16 --workers 0 --device cpu \
    --no-progress --out "$OUT/features.h5"
on_two_nodes cluster --features "$OUT/features.h5" --k 4 --pca-dim 16 --backend torch --device cpu \
    --no-progress --out "$OUT/clusters.h5"
