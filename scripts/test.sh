#!/usr/bin/env bash
# Set up .venv if needed and run the test suite (CPU, toy images). Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
python -m pytest tests -q "$@"
