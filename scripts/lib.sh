# Helpers sourced by the GPU-box scripts (noroozi_transfer.sh, self_training.sh); not run on its own.
# SSL is the command that runs ssl-cli (default: this checkout's .venv if present, else `ssl`).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${SSL:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then SSL="$ROOT/.venv/bin/python -m ssl_cli"; else SSL="ssl"; fi
fi
PYTHON="${SSL% -m ssl_cli}"
[[ "$PYTHON" == "$SSL" ]] && PYTHON="python"

# parse_args SCRIPT REQUIRED OPTIONAL -- "$@": every `--some-name VALUE` of the named flags sets
# SOME_NAME=VALUE; -h/--help prints the script's header; a missing required flag is exit 2.
parse_args() {
  local script="$1" required="$2" optional="$3"
  shift 4
  while [[ $# -gt 0 ]]; do
    local flag="${1#--}"
    if [[ "$1" == "-h" || "$1" == "--help" ]]; then
      sed -n '2,/^set -euo/p' "$script" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0
    fi
    if [[ " $required $optional " != *" $flag "* || $# -lt 2 ]]; then
      echo "error: unknown argument or missing value: $1; see --help" >&2; exit 2
    fi
    local name="${flag//-/_}"
    printf -v "${name^^}" '%s' "$2"
    shift 2
  done
  for flag in $required; do
    local name="${flag//-/_}"
    name="${name^^}"
    if [[ -z "${!name:-}" ]]; then
      echo "error: --${required// / and --} are required; see --help" >&2; exit 2
    fi
  done
  if [[ -z "${GPUS:-}" ]]; then
    GPUS="$($PYTHON -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
  fi
}

step() { printf '\n== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

# A stage that runs in one process (extract, cluster, pseudolabel, self-train).
ssl_one() { $SSL "$@"; }

# A training stage (pretext, retrain, finetune): under torchrun with one process per GPU when there
# are several; each process trains on its share of every batch and rank 0 writes the files.
launch_training() {
  if [[ "$GPUS" -gt 1 ]]; then
    $PYTHON -m torch.distributed.run --standalone --nproc_per_node "$GPUS" -m ssl_cli "$@"
  else
    $SSL "$@"
  fi
}

# Print the top-1 of every layer/model recorded in finetune metrics.json files.
show_metrics() {
  $PYTHON - "$@" <<'EOF'
import json, sys
for path in sys.argv[1:]:
    report = json.load(open(path))
    for layer, values in report["layers"].items():
        print(f"{path}: {report['mode']} {layer} top-1 {values['top1']:.4f} ({values['n']} images)")
EOF
}
