#!/usr/bin/env bash
# The accelerator benchmarks in one run: train-step MFU (bfloat16 and float32 steps) and streaming
# training throughput on random-weight Gemma 3 270M and 1B, JSON into $OUT (default ./runs/accel).
# Each part has its own time limit, so a failure or a slow part still leaves the others' JSON.
# Usage: OUT=dir PEAK_TFLOPS=989 [PARTS="stream_270m stream_1b"] bash benchmarks/accelerator.sh
# (989: the H100/H200 datasheet's dense bf16 TFLOP/s; PARTS: a subset of the parts below.)
set -u
OUT=${OUT:-runs/accel}
PEAK=${PEAK_TFLOPS:-989}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import jax, penzai, gemma_scope_pz; print(jax.__version__, jax.devices())" 2>&1 | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >>"$OUT/env.txt" 2>&1

part() {  # part NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  [[ " ${PARTS:-$name} " == *" $name "* ]] || return 0
  shift 2
  local began=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.json" 2>"$OUT/$name.err"
  echo "$name: rc $? in $((SECONDS - began)) s; $(tail -c 300 "$OUT/$name.err" | tr '\n' ' ')"
}

shapes=(--shape 640,16384,4096 --shape 2304,65536,4096)
part step_bf16 120 python3 benchmarks/train_step.py --peak --peak-tflops "$PEAK" --group 20 \
  --steps 5 --dtype bfloat16 "${shapes[@]}"
part stream_270m 200 python3 benchmarks/stream_throughput.py --preset 270m --tokens 4000000 \
  --d-sae 16384 --many --peak --peak-tflops "$PEAK" --out "$OUT/stream_270m.partial.json"
part step_f32 90 python3 benchmarks/train_step.py --peak-tflops "$PEAK" --group 10 --steps 5 \
  --dtype float32 "${shapes[@]}"
part stream_1b 100 python3 benchmarks/stream_throughput.py --preset 1b --tokens 4000000 \
  --d-sae 65536 --peak-tflops "$PEAK" --out "$OUT/stream_1b.partial.json"
