#!/usr/bin/env bash
# Set everything up, lint (flake8, configured in setup.cfg: any finding fails), then run the test
# suite (fast tests; add -m slow for the end-to-end ones), with the 15 slowest tests listed.
set -euo pipefail
cd "$(dirname "$0")"
REQUIREMENTS=requirements-test.txt source scripts/setup_env.sh
echo "lint: flake8 $(flake8 --version | cut -d' ' -f1)"
flake8 .
python -m pytest -q --durations=15 "$@"
