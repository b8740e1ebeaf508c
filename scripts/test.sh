#!/usr/bin/env bash
# Set up .venv if needed and run the test suite (CPU, toy images). Extra args go to pytest.
# Two pytest-xdist workers (SSL_TEST_WORKERS, default 2: one per core here): most tests are a
# single-threaded process start plus a small model, so two at once use both cores. A file stays on one
# worker (--dist loadfile), so its module-scoped fixtures are made once.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
python -m pytest tests -q -n "${SSL_TEST_WORKERS:-2}" --dist loadfile "$@"
