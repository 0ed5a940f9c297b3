#!/usr/bin/env bash
# Stage 4's choices, on the val classes of a finished toy run (bash run.sh first):
#
#   bash experiments/stage4_val.sh [RUN]     (default runs/toy) -> RUN/stage4_val.md
#
#   - the reconstructor's reading: semantic (t_c and g(S) mixed, then h: the default) against
#     visual (h(t_c) and h(g(S)) mixed in the visual space);
#   - SynMine's image vote for the base classes (02_mine.py --image-weight): with it (the base
#     vectors then get a vote the val and novel ones never get) against without it (every
#     split's vectors made the same way), each through its own stage 3 and stage 4.
# The alternatives are trained into the same run folder under their own names; every variant
# is scored on the same val episodes, paired against the first. SEED: the run's training seed.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUN=${1:-runs/toy} PY=${PYTHON:-python3}
A="--run $RUN --dataset toy --clip toy-clip --seed ${SEED:-0}"
$PY 04_classifier.py $A --reconstructor visual --out 04_classifier_rec_visual.pt
$PY 02_mine.py $A --llm toy --image-weight 0 --out 02_semantics_novote.pt
$PY 03_bridge.py $A --semantics 02_semantics_novote.pt --out 03_bridge_novote.pt
$PY 04_classifier.py $A --semantics 02_semantics_novote.pt --bridge 03_bridge_novote.pt \
  --out 04_classifier_novote.pt
$PY experiments/stage4_val.py "$RUN" semantic=04_classifier.pt visual=04_classifier_rec_visual.pt \
  no-image-vote=04_classifier_novote.pt,02_semantics_novote.pt,03_bridge_novote.pt
