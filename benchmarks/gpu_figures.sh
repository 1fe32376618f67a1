#!/usr/bin/env bash
# Every GPU figure the open issues ask for, as one prepared command for a lent GPU (about 9
# minutes; each part under its own timeout, and a part that fails or times out keeps what it
# wrote while the next one runs), most needed first:
#
#   1. codes     (issue 65) 8-bit and 4-bit codes after 5 steps on the GPU (two passes) against
#                the same steps on that machine's CPU (one pass) (benchmarks.gpu_codes);
#   2. lm        (issue 64) the language-model program's train step at GPT-2 small's shapes,
#                AdamW and SOAP's setting to use: tokens a second and the optimizer's share
#                (benchmarks/lm_gpt2_gpu.sh, its speed parts);
#   3. programs  (issue 65) GPT-2 small's optimizer steps (float32, 8-bit, 4-bit, offloaded, in
#                slices; float32 and 8-bit as FlatParams), each timed beside float32 AdamW and
#                beside the time model's prediction for the program as compiled there
#                (benchmarks.measured_programs);
#   4. offload   (issue 65, OFFLOAD=1) the 98M transformer's steps, state offloaded against on
#                the device (the offload section's time rows; the train step also with the
#                state in the gradients' order, four leaves ahead).
#
#   OUT=benchmarks/results bash benchmarks/gpu_figures.sh
#   SMOKE=1 TREE=small OFFLOAD=1 OUT=/tmp/figures bash benchmarks/gpu_figures.sh  # a CPU, 2 min
#
# Results under $OUT: gpu_codes_<card>.json, lm_gpt2_<device>.json, programs_<card>.json,
# offload_train_step_<card>.json and each part's log (8 files at most).
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
CARD=$("$PYTHON" -c "import jax; k = jax.devices()[0].device_kind; print('h200' if 'H200' in k else 'h100')")

run_part() {  # run_part NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  echo "== $name (timeout ${seconds}s) $(date -u +%T)"
  timeout --kill-after=5 "$seconds" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit status $? $(date -u +%T)"
  tail -n 25 "$OUT/$name.log"
}

run_part codes 50 "$PYTHON" -m benchmarks.gpu_codes --out "$OUT/gpu_codes_$CARD.json"
run_part lm 320 env RACE=0 SPEED_TIMEOUT=110 SOAP_SPEED_TIMEOUT=200 OUT_DIR="$OUT" \
  PYTHON="$PYTHON" bash benchmarks/lm_gpt2_gpu.sh
run_part programs 170 "$PYTHON" -m benchmarks.measured_programs --tree "${TREE:-gpt2}" \
  --card "$CARD" --programs adamw adamw_8bit "4-bit moments" "offload_state(adamw)" \
  "step_in_slices(adamw_8bit)" "adamw, FlatParams" "adamw_8bit, FlatParams" \
  --out "$OUT/programs_$CARD.json"
if [[ "${OFFLOAD:-0}" == 1 ]]; then
  run_part offload 150 "$PYTHON" -c "
import json, sys
from benchmarks.sections import offload
rows = offload.time_rows(10, 16)
open(sys.argv[1], 'w').write(json.dumps(rows, indent=2) + '\n')
" "$OUT/offload_train_step_$CARD.json"
fi
