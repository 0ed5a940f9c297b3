#!/usr/bin/env bash
# The defaults that were chosen by measuring, measured again on the val classes only:
#   stage 2: --keep and --temperature, by the teacher's zero-shot accuracy of the mined
#            vectors (02_mine.py --compare --split val);
#   stage 4: --gate-lr, --train-rec and --w-rec, by the val table of 05_eval.py --split val.
# For training seeds 0, 1 and 2; stages 1-3 are taken from experiments/seeds.sh's runs
# (runs/toy-seeds/seedS, trained first if absent).
#
#   bash experiments/defaults.sh  -> runs/toy-defaults/mining.md (stage 2)
#                                    runs/toy-defaults/sweep_val.md (stage 4; sweep.md is not made)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/toy-defaults} SEEDS=${SEEDS:-0 1 2} SEEDRUNS=${SEEDRUNS:-runs/toy-seeds}
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # as run.sh: the same figures whatever the core count
KEEPS=${KEEPS:-0.5 0.7 0.9 1} TEMPERATURES=${TEMPERATURES:-0.03 0.1 0.3 1}
# name:flags of each stage-4 variant ("default" is the checked-in default)
VARIANTS=${VARIANTS:-"default: gate-lr-1e-3:--gate-lr=1e-3 gate-lr-3e-2:--gate-lr=3e-2 train-rec:--train-rec train-rec-w-rec-1:--train-rec,--w-rec=1"}
mined=() named=()
for s in $SEEDS; do
  src="$SEEDRUNS/seed$s"
  [ -f "$src/03_bridge.pt" ] || OUT="$SEEDRUNS" SEEDS=$s bash experiments/seeds.sh
  # stage 2: the teacher zero-shot accuracy on val classes of each (keep, temperature)
  mrun="$OUT/mine-seed$s"
  for k in $KEEPS; do
    for t in $TEMPERATURES; do
      $PY 02_mine.py --run "$mrun" --seed "$s" --llm toy --compare --split val --keep "$k" --temperature "$t" \
        --out "02_semantics_keep${k}_t${t}.pt"
      mined+=("keep $k, temperature $t/$s=$mrun/02_descriptions_keep${k}_t${t}.json")
    done
  done
  # stage 4: each variant on the same stages 1-3, scored on the val classes
  for v in $VARIANTS; do
    name=${v%%:*} flags=${v#*:}
    run="$OUT/$name-seed$s"
    mkdir -p "$run"
    cp "$src/01_student.pt" "$src/02_semantics.pt" "$src/03_bridge.pt" "$run/"
    $PY 04_classifier.py --run "$run" --seed "$s" ${flags//[,=]/ }
    $PY 05_eval.py --run "$run" --seed "$s" --split val
    named+=("$name/$s=$run")
  done
done
$PY experiments/tables.py mining "$OUT" "${mined[@]}"
$PY experiments/tables.py sweep "$OUT" --val-only "${named[@]}"
