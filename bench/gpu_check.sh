#!/usr/bin/env bash
# What a lent GPU should measure, in under 8 minutes (its output is what docs/REAL_DATA.md
# quotes once it has run on one; it has not yet):
#   1. the standard-width smoke of all five stages, ViT-B-32 with random weights, on a fake
#      mini-ImageNet (bench/real_smoke.py): time, images/s and peak GPU memory per stage, and
#      the full-run estimate at those rates;
#   2. stage-1 images/s at the preset's batch 128, with and without --amp (bf16), peak memory.
#
#   bash bench/gpu_check.sh | tee gpu_check.txt
#   DEVICE=cpu bash bench/gpu_check.sh     the same steps at toy sizes on a CPU: checks the script
#   DRY_RUN=1 bash bench/gpu_check.sh      prints the commands only
# Each step has a time limit (timeout), so one that hangs cannot use up the machine.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then  # a check of the script, not a measurement
  SMOKE="--device cpu --n-train 4 --workers 0 --widths 8,16,16,32"  # stage 4 needs 4 a class
  S1="--device cpu --n-train 2 --workers 0 --widths 8,16,16,32 --batch-size 32"
  T_SMOKE=900 T_S1=300
else
  SMOKE="--device $DEVICE --n-train 4 --workers 4"
  S1="--device $DEVICE --n-train 40 --workers 6 --batch-size 128"  # 20 steps of 128
  T_SMOKE=270 T_S1=80
fi
step() { local limit=$1; shift; echo "== $*"
  if [ -n "${DRY_RUN:-}" ]; then return; fi
  timeout "$limit" "$@"; local rc=$?
  [ $rc -eq 0 ] || echo "GPU_CHECK step failed (exit $rc$([ $rc -eq 124 ] && echo ": over ${limit}s"))"; }

start=$(date +%s)
echo "== gpu_check $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(date -u +%FT%TZ)"
[ -n "${DRY_RUN:-}" ] || { command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"; }
step "$T_SMOKE" $PY bench/real_smoke.py $SMOKE
step "$T_S1" $PY bench/real_smoke.py --stage1-only --amp $S1
step "$T_S1" $PY bench/real_smoke.py --stage1-only --no-amp $S1
echo "== gpu_check done in $(( $(date +%s) - start ))s"
