#!/usr/bin/env bash
# The whole SynTrans pipeline, five stages in order, into one run folder.
#
#   bash run.sh                 the offline toy world on a CPU (under 10 minutes on 2 cores) -> runs/toy/results.md
#   bash run.sh toy-tiny        a tiny toy run (a minute or two; what the end-to-end test runs)
#   DATA_ROOT=/data/cifar bash run.sh cifar-fs      a real benchmark on one GPU (docs/REAL_DATA.md):
#   cifar-fs | fc100 | mini-imagenet | tiered-imagenet | folder (your own dataset),
#   with CLIP=ViT-B-32 PRETRAINED=openai by default
#
# Your flags win over the preset's: EXTRA="..." goes to every stage (flags they all take, such
# as --device cpu or --seed 1), EXTRA1="..." ... EXTRA5="..." to one stage, e.g.
# EXTRA1="--epochs 1 --workers 0" EXTRA4="--steps 20". RUN, DATA_ROOT and PRETRAINED (a file)
# may be relative to where you stand, and may hold spaces (each is one argument). The flag
# variables (EXTRA, EXTRA1 ... EXTRA5, LLM) are split into words on purpose, one flag per word
# (and never glob-expanded: set -f), so a path inside them cannot hold a space.
# DRY_RUN=1 prints the commands without running them (quoted as a shell would need them).
# A real dataset and its teacher are checked first (common.py check), before hours of stage 1.
# Each stage writes a checkpoint that the next one reads; a stage that fails stops the script.
set -euf -o pipefail
here=$PWD
abs() { case "$1" in /*) echo "$1" ;; *) echo "$here/$1" ;; esac; }
cd "$(dirname "$0")"
preset=${1:-toy}
PY=${PYTHON:-python3}
[ -n "${RUN:-}" ] && RUN=$(abs "$RUN")

# The toy presets run torch on one thread: the same figures whatever the core count (float sums
# are ordered by the thread count), and no slower on 2 busy cores, where threads wait on
# each other. Set OMP_NUM_THREADS yourself to override.
case "$preset" in toy*) export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ;; esac

case "$preset" in
  toy)
    RUN=${RUN:-runs/toy}
    DATA=(--dataset toy --clip toy-clip)
    S1="" S2="--llm toy" S3="" S4="" S5="" ;;
  toy-tiny)
    RUN=${RUN:-runs/toy-tiny}
    DATA=(--dataset toy-tiny --clip toy-clip-tiny)
    S1="--epochs 2 --val-episodes 50" S2="--llm toy" S3="--epochs 5 --val-episodes 50"
    S4="--steps 60 --val-every 30 --val-episodes 50" S5="--episodes 100" ;;
  cifar-fs|fc100|mini-imagenet|tiered-imagenet|folder)
    : "${DATA_ROOT:?set DATA_ROOT to the dataset folder (see docs/REAL_DATA.md)}"
    DATA_ROOT=$(abs "$DATA_ROOT")
    PRETRAINED=${PRETRAINED:-openai}
    [ -e "$(abs "$PRETRAINED")" ] && PRETRAINED=$(abs "$PRETRAINED")  # a weights file, else an open_clip tag
    RUN=${RUN:-runs/$preset}
    DATA=(--dataset "$preset" --data-root "$DATA_ROOT" --clip "${CLIP:-ViT-B-32}"
          --clip-pretrained "$PRETRAINED")
    S1="--widths 64,160,320,640 --epochs ${EPOCHS:-90} --batch-size 128 --lr 0.05 --drop-rate 0.1 --workers 8"
    # language models: LLM="--llm http://localhost:8000/v1@my-model" (several --llm may be given)
    S2="${LLM:-}" S3="--hidden 1024" S4="--steps 4000" S5="" ;;
  *)
    echo "unknown preset '$preset': use toy, toy-tiny, cifar-fs, fc100, mini-imagenet, tiered-imagenet or folder" >&2
    exit 2 ;;
esac
ARGS=(--run "$RUN" "${DATA[@]}")
T="02_semantics_templates.pt"

# a command, or with DRY_RUN=1 the command printed (a word with a space or quote quoted)
cmd() {
  if [ -z "${DRY_RUN:-}" ]; then "$@"; return; fi
  local w out=()
  for w in "$@"; do
    if [[ $w =~ ^[][A-Za-z0-9_./,=:@%+-]+$ ]]; then out+=("$w"); else out+=("$(printf %q "$w")"); fi
  done
  echo "${out[*]}"
}
# one stage: the preset's flags, then yours (argparse keeps the last value of a flag); the
# $S* and EXTRA* flag lists are unquoted on purpose (see the top)
run() { local n=$1; shift; local extra="EXTRA$n"; cmd $PY "$@" ${EXTRA:-} ${!extra:-}; }

case "$preset" in toy|toy-tiny) ;; *)
  echo "== the data folder and the teacher, checked first"
  cmd $PY common.py check "${DATA[@]}" ;;
esac
echo "== stage 1: distil the CLIP teacher into the student (and the CE-only baseline)"
run 1 01_distill.py "${ARGS[@]}" $S1 --distill-weight 0
run 1 01_distill.py "${ARGS[@]}" $S1
echo "== stage 2: SynMine (and the templates-only ablation)"
run 2 02_mine.py "${ARGS[@]}" $S2
run 2 02_mine.py "${ARGS[@]}" --sources templates --out "$T"
echo "== stage 3: VSBird, the visual-semantic bridge"
run 3 03_bridge.py "${ARGS[@]}" $S3
run 3 03_bridge.py "${ARGS[@]}" $S3 --semantics "$T" --out 03_bridge_templates.pt
echo "== stage 4: visual weight generator + semantic weight reconstructor (and six ablations)"
run 4 04_classifier.py "${ARGS[@]}" $S4
run 4 04_classifier.py "${ARGS[@]}" $S4 --visual-only --out 04_classifier_visual.pt
run 4 04_classifier.py "${ARGS[@]}" $S4 --reconstructor none --out 04_classifier_no_rec.pt
run 4 04_classifier.py "${ARGS[@]}" $S4 --reconstructor one-way --out 04_classifier_one_way.pt
run 4 04_classifier.py "${ARGS[@]}" $S4 --gate shared --out 04_classifier_fixed_gate.pt
run 4 04_classifier.py "${ARGS[@]}" $S4 --shuffle-semantics --out 04_classifier_shuffled.pt
run 4 04_classifier.py "${ARGS[@]}" $S4 --semantics "$T" --bridge 03_bridge_templates.pt \
  --out 04_classifier_templates.pt
echo "== stage 5: the val table (where choices are made), then the novel-class table"
run 5 05_eval.py "${ARGS[@]}" $S5 --split val
run 5 05_eval.py "${ARGS[@]}" $S5
