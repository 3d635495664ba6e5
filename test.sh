#!/bin/bash
# The test suite: bash test.sh [pytest args...]
# Installs uv if missing, syncs the locked environment, runs pytest (fast tests; add `-m slow` for the slow ones).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/uv_env.sh
uv run --frozen python -m pytest -q "$@"
