#!/usr/bin/env bash
# The test suite in one command, on a fresh machine too: sets up .venv if needed, then ruff and pytest.
# CI (.ci/run) runs exactly this. Extra arguments go to pytest, e.g.  bash scripts/test.sh -k resume
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_env.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q --durations=15 tests "$@"
