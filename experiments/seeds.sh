#!/usr/bin/env bash
# The toy pipeline (bash run.sh) for training seeds 0, 1 and 2, every seed scored on the
# same episodes, then the seed tables of the val and the novel classes:
#
#   bash experiments/seeds.sh      -> runs/toy-seeds/seed{0,1,2}/ (each a whole run folder)
#                                     runs/toy-seeds/seeds_val.md, seeds.md, seeds.json
#
# The seed goes to stages 1-4 (and the toy describer, which decides the classes it
# misreads); stage 5's episodes come from its own --episode-seed. About 4 minutes per seed
# on 2 idle CPU cores with the stand-in CLIP cached. OUT, SEEDS and PRESET change what runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/toy-seeds} SEEDS=${SEEDS:-0 1 2} PRESET=${PRESET:-toy}
runs=()
for s in $SEEDS; do
  echo "==== training seed $s"
  RUN="$OUT/seed$s" EXTRA="--seed $s ${EXTRA:-}" bash run.sh "$PRESET"
  runs+=("$OUT/seed$s")
done
${PYTHON:-python3} experiments/tables.py seeds "$OUT" "${runs[@]}"
