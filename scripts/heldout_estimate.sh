#!/usr/bin/env bash
# Honest held-out estimate of the default recipe (issue 4/6): fold VAL of a 5-fold split is
# never seen by any teacher nor by the student. Teachers i != VAL each hold out fold i and
# VAL, and label fold i (out-of-fold targets); the student trains on the other 4 folds.
# Usage: scripts/heldout_estimate.sh [DATA] [VAL_FOLD] [SEED] [OUT]
set -euo pipefail
DATA=${1:-../shared/data/training_data}; VAL=${2:-0}; SEED=${3:-0}; OUT=${4:-runs/estimate_v${VAL}_s${SEED}}
PY=${PYTHON:-python}
for i in 0 1 2 3 4; do
  [ "$i" = "$VAL" ] && continue
  [ -f "$OUT/teachers/f$i/teacher.pth" ] && continue
  $PY train_teacher.py --data "$DATA" --pretrained offline --fold "$i" --exclude-folds "$VAL" \
      --seed "$SEED" --out "$OUT/teachers/f$i"
done
$PY distill.py --data "$DATA" --teachers-root "$OUT/teachers" --val-fold "$VAL" --seed "$SEED" \
    --view-seed "$SEED" --out "$OUT/distilled/model.pth" --work-dir "$OUT/distilled"
$PY distill.py --data "$DATA" --scratch --val-fold "$VAL" --seed "$SEED" --view-seed "$SEED" \
    --out "$OUT/scratch/model.pth" --work-dir "$OUT/scratch"
