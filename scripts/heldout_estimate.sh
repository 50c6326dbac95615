#!/usr/bin/env bash
# Honest held-out estimate of a recipe: fold VAL of a 5-fold split is never seen by any teacher
# nor by the student. The default recipe's one teacher per recipe trains on the other 4 folds
# (with fold teachers, teacher i != VAL holds out fold i and VAL and labels fold i); the student
# trains on the other 4 folds, and so does the hard-label control (distill.py --hard-labels, same
# student recipe, same views). Re-running the same command resumes.
# Usage: scripts/heldout_estimate.sh [DATA] [VAL_FOLD] [SEED] [OUT] [pipeline.py flags...]
#   RECIPE=my.yaml scripts/heldout_estimate.sh ...   (default recipes/heldout.yaml: the default recipe, 5 folds)
set -euo pipefail
DATA=${1:-../shared/data/training_data}; VAL=${2:-0}; SEED=${3:-0}; OUT=${4:-runs/estimate_v${VAL}_s${SEED}}
shift $(( $# < 4 ? $# : 4 ))
${PYTHON:-python} pipeline.py --data "$DATA" --recipe "${RECIPE:-recipes/heldout.yaml}" --heldout-fold "$VAL" \
    --seed "$SEED" --teachers-root "$OUT/teachers" --out "$OUT/distilled/model.pth" --work-dir "$OUT" --no-report \
    --hard-label-control "$@"
