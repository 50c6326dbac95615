#!/usr/bin/env bash
# Set everything up and run the test suite (fast tests; add -m slow for the end-to-end ones),
# with the 15 slowest tests listed.
set -euo pipefail
cd "$(dirname "$0")"
REQUIREMENTS=requirements-test.txt source scripts/setup_env.sh
python -m pytest -q --durations=15 "$@"
