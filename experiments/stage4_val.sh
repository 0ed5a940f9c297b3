#!/usr/bin/env bash
# Stage 4's choices, on the val classes, on the stage-1 students of a toy run (bash run.sh first):
#
#   bash experiments/stage4_val.sh [RUN]     (default runs/toy) -> RUN/stage4_val.md
#
#   - the reconstructor's reading: semantic (t_c and g(S) mixed, then h) against visual (h(t_c)
#     and h(g(S)) mixed in the visual space), both on SynMine vectors with the image vote;
#   - SynMine's image vote for the base classes (02_mine.py --image-weight 1: the base vectors
#     then get a vote the val and novel ones never get) against none (--image-weight 0: every
#     split's vectors made the same way), each through its own stage 3 and stage 4 (semantic).
# Every variant is trained with its flags spelled out (whatever the defaults), into the run
# folder under its own names, and scored on the same val episodes, paired against the first.
# SEED: the run's training seed. (The defaults, visual and --image-weight 0, were chosen by
# this comparison: docs/RESULTS.md.)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUN=${1:-runs/toy} PY=${PYTHON:-python3}
A="--run $RUN --dataset toy --clip toy-clip --seed ${SEED:-0}"
for w in 1 0; do
  $PY 02_mine.py $A --llm toy --image-weight $w --out 02_semantics_vote$w.pt
  $PY 03_bridge.py $A --semantics 02_semantics_vote$w.pt --out 03_bridge_vote$w.pt
done
S="--semantics 02_semantics_vote1.pt --bridge 03_bridge_vote1.pt"
$PY 04_classifier.py $A $S --reconstructor semantic --out 04_classifier_semantic_vote1.pt
$PY 04_classifier.py $A $S --reconstructor visual --out 04_classifier_visual_vote1.pt
$PY 04_classifier.py $A --semantics 02_semantics_vote0.pt --bridge 03_bridge_vote0.pt \
  --reconstructor semantic --out 04_classifier_semantic_vote0.pt
$PY experiments/stage4_val.py "$RUN" \
  semantic=04_classifier_semantic_vote1.pt,02_semantics_vote1.pt,03_bridge_vote1.pt \
  visual=04_classifier_visual_vote1.pt,02_semantics_vote1.pt,03_bridge_vote1.pt \
  no-image-vote=04_classifier_semantic_vote0.pt,02_semantics_vote0.pt,03_bridge_vote0.pt
