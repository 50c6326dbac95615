#!/usr/bin/env bash
# Set everything up and run the default pipeline: teachers -> distillation -> model.pth -> report.
# Usage: ./run.sh [DATA_DIR] [pipeline.py flags]   (DATA_DIR defaults to $DATA or ../shared/data/training_data)
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
DATA_DIR=${1:-${DATA:-../shared/data/training_data}}
shift || true
exec python pipeline.py --data "$DATA_DIR" "$@"
