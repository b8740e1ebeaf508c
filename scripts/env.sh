# Sourced by the other scripts: make sure .venv exists and holds this project with its dev extras.
# Re-installs only when pyproject.toml or the faiss build changed since the last install.
#
# SSL_FAISS picks faiss's build: gpu (faiss-gpu), cpu (faiss-cpu, ~1 GB smaller), or auto (the
# default: gpu when nvidia-smi lists a GPU, else cpu).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SSL_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
FAISS="${SSL_FAISS:-auto}"
if [ "$FAISS" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then FAISS=gpu; else FAISS=cpu; fi
fi
case "$FAISS" in
  gpu|cpu) ;;
  *) echo "error: SSL_FAISS must be gpu, cpu or auto, not $FAISS" >&2; exit 2 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
stamp="$VENV/.ssl-cli-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1) faiss-$FAISS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing ssl-cli with faiss-$FAISS into $VENV (torch is large: a few minutes the first time)" >&2
  # The two faiss builds install the same module: remove the other one before installing.
  other=$([ "$FAISS" = gpu ] && echo faiss-cpu || echo faiss-gpu)
  "$VENV/bin/python" -m pip uninstall --quiet --yes "$other" >/dev/null 2>&1 || true
  # torch first, pinned to the releases this project is tested with, so pip never picks a newer CUDA build.
  "$VENV/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev,$FAISS]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
