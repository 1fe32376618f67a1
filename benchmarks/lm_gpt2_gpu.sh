#!/usr/bin/env bash
# The language-model program at GPT-2 small's shapes on one GPU (issue 64): 12 blocks, d = 768,
# 12 heads, windows of 1024 bytes, 64 windows a step (in GRAD_ACCUMULATION micro-batches),
# bfloat16 products over float32 params (--compute-dtype bfloat16), on Python's standard-library
# source (offline).
#
#   1. AdamW, then SOAP (the setting to use: benchmarks.sections.soap.PRACTICAL, blocks of 128,
#      bfloat16 factors and bases, 8-bit first moment, bfloat16 second, basis_rectification=0;
#      its state stacked by block shape, stack_blocks=True), a few steps each: tokens a second, MFU and the optimizer's share of the step
#      (--time-optimizer).
#   2. A race, the same windows for both: the held-out loss against the seconds of training.
#
# Results: benchmarks/results/lm_gpt2_<device>.json (OUT_DIR to write elsewhere). Each part has
# its own timeout (2 x 70 s, 2 x 135 s and 30 s: under 8 minutes in all, one H100); a part that
# fails or times out is recorded as such, with the records it wrote, and the next one runs. The
# learning rate (1e-3, warm-up then cosine decay) is GPT-2 small's usual order, tuned for
# neither optimizer.
#
#   bash benchmarks/lm_gpt2_gpu.sh            # on the GPU
#   SMOKE=1 bash benchmarks/lm_gpt2_gpu.sh    # every command at tiny sizes on a CPU (a minute)
#   RACE=0 SOAP_SPEED_TIMEOUT=170 bash benchmarks/lm_gpt2_gpu.sh   # the speed parts alone
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
WORK=$(mktemp -d)
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/jax_cache}

if [[ "${SMOKE:-0}" == 1 ]]; then
  MODEL=(--layers 1 --d-model 32 --heads 2 --seq-len 32 --batch-size 4)
  GRAD_ACCUMULATION=${GRAD_ACCUMULATION:-2}
  SPEED_STEPS=2 RACE_STEPS=4 EVAL_EVERY=2 EVAL_WINDOWS=8
  SPEED_TIMEOUT=120 RACE_TIMEOUT=120
  OUT_DIR=${OUT_DIR:-$WORK}
else
  MODEL=(--layers 12 --d-model 768 --heads 12 --seq-len 1024 --batch-size 64)
  # 16 windows a micro-batch: their activations (bfloat16, XLA's attention) well inside 80 GB.
  GRAD_ACCUMULATION=${GRAD_ACCUMULATION:-4}
  SPEED_STEPS=12 RACE_STEPS=200 EVAL_EVERY=25 EVAL_WINDOWS=128
  SPEED_TIMEOUT=${SPEED_TIMEOUT:-70} RACE_TIMEOUT=${RACE_TIMEOUT:-135}
  OUT_DIR=${OUT_DIR:-benchmarks/results}
fi
COMMON=("${MODEL[@]}" --grad-accumulation "$GRAD_ACCUMULATION" --compute-dtype bfloat16
        --learning-rate 1e-3 --seed 0)
declare -A OPTIMIZER
OPTIMIZER[adamw]="--optimizer adamw"
OPTIMIZER[soap]="--optimizer soap --moments 8bit --opt block_size=128 --opt factor_dtype=bfloat16
  --opt basis_dtype=bfloat16 --opt nu_dtype=bfloat16 --opt basis_rectification=0
  --opt stack_blocks=True"

# part NAME SECONDS ARGS...: the program with ARGS in $WORK/NAME, its exit status in
# $WORK/NAME/status (124: timed out), its output in $WORK/NAME.log.
part() {
  local name=$1 seconds=$2
  shift 2
  mkdir -p "$WORK/$name"
  echo "== $name (timeout ${seconds}s)"
  local status=0
  timeout --kill-after=5 "$seconds" "$PYTHON" -m examples.lm "$@" --workdir "$WORK/$name" \
    2>&1 | tee "$WORK/$name.log" || status=${PIPESTATUS[0]}
  echo "$status" > "$WORK/$name/status"
}

declare -A TIMEOUT=([adamw]=$SPEED_TIMEOUT [soap]=${SOAP_SPEED_TIMEOUT:-$SPEED_TIMEOUT})
for name in adamw soap; do
  # shellcheck disable=SC2086  # the optimizer's flags split on purpose
  part "speed_$name" "${TIMEOUT[$name]}" "${COMMON[@]}" ${OPTIMIZER[$name]} \
    --steps "$SPEED_STEPS" --eval-every "$((SPEED_STEPS / 2))" --eval-windows "$EVAL_WINDOWS" \
    --checkpoint-every 1000000 --time-optimizer
done
for name in adamw soap; do
  [[ "${RACE:-1}" == 1 ]] || break
  # shellcheck disable=SC2086
  part "race_$name" "$RACE_TIMEOUT" "${COMMON[@]}" ${OPTIMIZER[$name]} \
    --steps "$RACE_STEPS" --eval-every "$EVAL_EVERY" --eval-windows "$EVAL_WINDOWS" \
    --checkpoint-every 1000000
done

timeout 30 "$PYTHON" - "$WORK" "$OUT_DIR" "${SMOKE:-0}" "${COMMON[@]}" <<'EOF'
"""Collects the parts' metrics.jsonl and optimizer_share.json into one JSON file."""

import datetime
import json
import re
import sys
from pathlib import Path

import jax

work, out_dir, smoke, flags = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
tokens_a_step = int(flags[flags.index("--batch-size") + 1]) * int(flags[flags.index("--seq-len") + 1])
kind = jax.devices()[0].device_kind
device = re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") + ("_smoke" if smoke else "")


def records(name):
    path = work / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def status(name):
    if not (work / name / "status").exists():
        return "not run"
    code = int((work / name / "status").read_text())
    return "ok" if code == 0 else "timed out" if code in (124, 137) else f"exit status {code}"


report = {
    "date": datetime.date.today().isoformat(),
    "device": kind,
    "flags": " ".join(flags),
    "speed": {},
    "race": {},
}
for optimizer in ("adamw", "soap"):
    name = f"speed_{optimizer}"
    speed = {"status": status(name)}
    if rows := records(name):
        last = rows[-1]  # the steps after the first record's: compiled and warm
        speed["tokens_per_second"] = last["tokens_per_second"]
        speed["model_flops_utilization"] = last.get("model_flops_utilization")
    share = work / name / "optimizer_share.json"
    if share.exists():
        speed |= json.loads(share.read_text())
    report["speed"][optimizer] = speed
    # The seconds of training at each record: its steps' tokens over its tokens a second
    # (evaluations not counted), summed.
    name, seconds, previous_step, curve = f"race_{optimizer}", 0.0, 0, []
    for row in records(name):
        seconds += (row["step"] - previous_step) * tokens_a_step / row["tokens_per_second"]
        previous_step = row["step"]
        curve.append({"seconds": seconds} | row)
    report["race"][optimizer] = {"status": status(name), "records": curve}

out_dir.mkdir(parents=True, exist_ok=True)
path = out_dir / f"lm_gpt2_{device}.json"
path.write_text(json.dumps(report, indent=2) + "\n")
print(f"\n{kind}: {report['flags']}")
for optimizer, speed in report["speed"].items():
    line = f"{optimizer:>6} speed ({speed['status']}):"
    if "tokens_per_second" in speed:
        line += f" {speed['tokens_per_second']:,.0f} tokens/s"
    if speed.get("model_flops_utilization") is not None:
        line += f", MFU {speed['model_flops_utilization']:.1%}"
    if "share" in speed:
        line += (
            f", optimizer {speed['optimizer_seconds'] * 1e3:.3g} ms of "
            f"{speed['step_seconds'] * 1e3:.3g} ms a step ({speed['share']:.0%})"
        )
    print(line)
for optimizer, race in report["race"].items():
    print(f"{optimizer:>6} race ({race['status']}): held-out loss at seconds of training")
    for row in race["records"]:
        print(f"        step {row['step']:>5}  {row['seconds']:8.1f} s  {row['held_out_loss']:.4f}")
print(f"wrote {path}")
EOF
echo "logs and work directories: $WORK"
