#!/usr/bin/env bash
# The defaults that were chosen by measuring, measured again on the val classes only,
# for training seeds 0, 1 and 2:
#
#   bash experiments/defaults.sh mining   stage 2's --keep and --temperature, by the teacher's
#                                          zero-shot accuracy of the mined vectors on val classes
#                                          (02_mine.py --compare --split val; needs only the teacher)
#                                          -> runs/toy-defaults/mining.md
#   bash experiments/defaults.sh stage4   stage 4's --gate-lr and --w-rec, by the
#                                          val table (05_eval.py --split val), on the stages 1-3 of
#                                          experiments/seeds.sh's runs (runs/toy-seeds/seedS, trained
#                                          first if absent) -> runs/toy-defaults/sweep_val.md
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/toy-defaults} SEEDS=${SEEDS:-0 1 2} SEEDRUNS=${SEEDRUNS:-runs/toy-seeds}
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # as run.sh: the same figures whatever the core count
KEEPS=${KEEPS:-0.5 0.7 0.9 1} TEMPERATURES=${TEMPERATURES:-0.03 0.1 0.3 1}
# name:flags of each stage-4 variant ("default" is the checked-in default; "," and "=" stand for spaces)
VARIANTS=${VARIANTS:-"default: gate-lr-1e-3:--gate-lr=1e-3 gate-lr-1e-1:--gate-lr=1e-1 w-rec-1:--w-rec=1"}
case "${1:-}" in
  mining)
    mined=()
    for s in $SEEDS; do
      for k in $KEEPS; do
        for t in $TEMPERATURES; do
          $PY 02_mine.py --run "$OUT/mine-seed$s" --seed "$s" --llm toy --compare --split val \
            --keep "$k" --temperature "$t" --out "02_semantics_keep${k}_t${t}.pt"
          mined+=("keep $k, temperature $t/$s=$OUT/mine-seed$s/02_descriptions_keep${k}_t${t}.json")
        done
      done
    done
    $PY experiments/tables.py mining "$OUT" "${mined[@]}" ;;
  stage4)
    named=()
    for s in $SEEDS; do
      src="$SEEDRUNS/seed$s"
      [ -f "$src/03_bridge.pt" ] || OUT="$SEEDRUNS" SEEDS=$s bash experiments/seeds.sh
      for v in $VARIANTS; do
        name=${v%%:*} flags=${v#*:}
        run="$OUT/$name-seed$s"
        mkdir -p "$run"
        cp "$src/01_student.pt" "$src/02_semantics.pt" "$src/03_bridge.pt" "$run/"
        mkdir -p "$run/cache"; cp -r "$src/cache/." "$run/cache/"  # the cached features of these files (their keys name what made them)
        $PY 04_classifier.py --run "$run" --seed "$s" ${flags//[,=]/ }
        $PY 05_eval.py --run "$run" --seed "$s" --split val
        named+=("$name/$s=$run")
      done
    done
    $PY experiments/tables.py sweep "$OUT" --val-only "${named[@]}" ;;
  *)
    echo "usage: bash experiments/defaults.sh mining|stage4" >&2; exit 2 ;;
esac
