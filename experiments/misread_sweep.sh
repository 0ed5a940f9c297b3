#!/usr/bin/env bash
# What stage 4 adds when the language model misreads more or fewer class names: the toy
# describer's misread rate 0, 0.1, 0.2 (the default) and 0.3, for training seeds 0, 1 and
# 2, on the val and the novel classes.
#
#   bash experiments/misread_sweep.sh   -> runs/toy-misread/RATE-seedS/ and
#                                          runs/toy-misread/sweep_val.md, sweep.md, sweep.json
#
# The misread rate belongs to the simulated language model (stage 2); stage 1 does not
# depend on it, so each seed's students are taken from experiments/seeds.sh's runs
# (runs/toy-seeds/seedS, trained first if absent) and stages 2-5 run again, without the
# templates-only and shuffled ablations. About 1 minute per rate and seed on 2 idle cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/toy-misread} SEEDS=${SEEDS:-0 1 2} RATES=${RATES:-0 0.1 0.2 0.3} SEEDRUNS=${SEEDRUNS:-runs/toy-seeds}
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # as run.sh: the same figures whatever the core count
named=()
for s in $SEEDS; do
  if [ ! -f "$SEEDRUNS/seed$s/01_student_ce.pt" ]; then
    OUT="$SEEDRUNS" SEEDS=$s bash experiments/seeds.sh
  fi
  for r in $RATES; do
    run="$OUT/$r-seed$s"
    echo "==== misread rate $r, training seed $s: $run"
    mkdir -p "$run"
    cp "$SEEDRUNS/seed$s/01_student.pt" "$SEEDRUNS/seed$s/01_student_ce.pt" "$run/"
    mkdir -p "$run/cache"; cp -r "$SEEDRUNS/seed$s/cache/." "$run/cache/"  # the cached features (their keys name what made them)
    A="--run $run --dataset toy --clip toy-clip --seed $s"
    $PY 02_mine.py $A --llm toy --toy-misread-rate "$r"
    $PY 03_bridge.py $A
    $PY 04_classifier.py $A
    $PY 04_classifier.py $A --gate shared --out 04_classifier_fixed_gate.pt
    $PY 05_eval.py $A --split val
    $PY 05_eval.py $A
    named+=("$r/$s=$run")
  done
done
$PY experiments/tables.py sweep "$OUT" "${named[@]}"
