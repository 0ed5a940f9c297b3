#!/usr/bin/env bash
# The whole SynTrans pipeline, five stages in order, into one run folder.
#
#   bash run.sh                 the offline toy world on a CPU (about 6 minutes on 2 cores) -> runs/toy/results.json
#   bash run.sh toy-tiny        a tiny toy run (a minute or two; what the end-to-end test runs)
#   DATA_ROOT=/data/cifar bash run.sh cifar-fs      a real benchmark on one GPU (see README):
#   cifar-fs | fc100 | mini-imagenet | tiered-imagenet, with CLIP=ViT-B-32 PRETRAINED=openai by default
#
# Extra flags for every stage can be passed in EXTRA, e.g. EXTRA="--device cpu".
# Each stage writes a checkpoint that the next one reads; a stage that fails stops the script.
set -euo pipefail
cd "$(dirname "$0")"
preset=${1:-toy}
PY=${PYTHON:-python3}

# The toy presets run torch on one thread: the same figures whatever the core count (float sums
# are ordered by the thread count), and no slower on 2 busy cores, where threads wait on
# each other. Set OMP_NUM_THREADS yourself to override.
case "$preset" in toy*) export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ;; esac

case "$preset" in
  toy)
    RUN=${RUN:-runs/toy}
    DATA="--dataset toy --clip toy-clip"
    S1="" S2="--llm toy" S3="" S4="" S5="" ;;
  toy-tiny)
    RUN=${RUN:-runs/toy-tiny}
    DATA="--dataset toy-tiny --clip toy-clip-tiny"
    S1="--epochs 2 --val-episodes 50" S2="--llm toy" S3="--epochs 5 --val-episodes 50"
    S4="--steps 60 --val-every 30 --val-episodes 50" S5="--episodes 100" ;;
  cifar-fs|fc100|mini-imagenet|tiered-imagenet)
    : "${DATA_ROOT:?set DATA_ROOT to the dataset folder (see README: Real benchmarks)}"
    RUN=${RUN:-runs/$preset}
    DATA="--dataset $preset --data-root $DATA_ROOT --clip ${CLIP:-ViT-B-32} --clip-pretrained ${PRETRAINED:-openai}"
    S1="--widths 64,160,320,640 --epochs ${EPOCHS:-90} --batch-size 128 --lr 0.05 --drop-rate 0.1 --workers 8"
    # language models: LLM="--llm http://localhost:8000/v1@my-model" (several --llm may be given)
    S2="${LLM:-}" S3="--hidden 1024" S4="--steps 4000" S5="" ;;
  *)
    echo "unknown preset '$preset': use toy, toy-tiny, cifar-fs, fc100, mini-imagenet or tiered-imagenet" >&2
    exit 2 ;;
esac
ARGS="--run $RUN $DATA ${EXTRA:-}"
T="02_semantics_templates.pt"

echo "== stage 1: distil the CLIP teacher into the student (and the CE-only baseline)"
$PY 01_distill.py $ARGS $S1 --distill-weight 0
$PY 01_distill.py $ARGS $S1
echo "== stage 2: SynMine (and the templates-only ablation)"
$PY 02_mine.py $ARGS $S2
$PY 02_mine.py $ARGS --sources templates --out $T
echo "== stage 3: VSBird, the visual-semantic bridge"
$PY 03_bridge.py $ARGS $S3
$PY 03_bridge.py $ARGS $S3 --semantics $T --out 03_bridge_templates.pt
echo "== stage 4: visual weight generator + semantic weight reconstructor (and three ablations)"
$PY 04_classifier.py $ARGS $S4
$PY 04_classifier.py $ARGS $S4 --gate shared --out 04_classifier_fixed_gate.pt
$PY 04_classifier.py $ARGS $S4 --shuffle-semantics --out 04_classifier_shuffled.pt
$PY 04_classifier.py $ARGS $S4 --semantics $T --bridge 03_bridge_templates.pt --out 04_classifier_templates.pt
echo "== stage 5: the val table (where choices are made), then the novel-class table"
$PY 05_eval.py $ARGS $S5 --split val
$PY 05_eval.py $ARGS $S5
