#!/usr/bin/env bash
# The paper's Table 7 setting on one GPU: Llama-2-7B shapes with random weights,
# batch 2 x 1024 tokens, bf16, peak GPU memory of all-module LoRA versus ILA's
# selections. Random weights have no learned importance, so the kept/dropped
# modules come from the seeded `random` strategy (the same number of each module
# type is not guaranteed: memory depends a little on which types are kept).
#   bash benchmarks/memory_speed/gpu_table7.sh lora [OUT_DIR]     # under 2 minutes on an H100
#   bash benchmarks/memory_speed/gpu_table7.sh qlora [OUT_DIR]    # needs bitsandbytes; under 2 minutes
set -euo pipefail
cd "$(dirname "$0")/../.."
ADAPTER=${1:?usage: gpu_table7.sh lora|qlora [OUT_DIR]}
OUT=$(realpath -m "${2:-bench-out/gpu}")
mkdir -p "$OUT"
export ILA_BENCH_CACHE=${ILA_BENCH_CACHE:-/tmp/ila-bench} PYTHONUNBUFFERED=1
python -m benchmarks.memory_speed.run --model random-llama-2-7b --strategy random --device cuda \
  --adapters "$ADAPTER" --batch 2 --seq 1024 --steps 5 --json "$OUT/table7-$ADAPTER.json"
