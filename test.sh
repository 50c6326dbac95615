#!/usr/bin/env bash
# Set everything up and run the test suite (fast tests; add -m slow for the end-to-end ones).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
python -m pytest -q "$@"
