#!/usr/bin/env bash
# The quick CPU suite (3.5 minutes on the README's 2-core machine): search cost
# and agreement with a longer search on the tiny quick-start model, and memory /
# step time of all-module LoRA versus ILA's selections on a random Llama-shaped
# model.
#   bash benchmarks/quick.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-bench-out/quick}")
mkdir -p "$OUT"
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1

python - "$OUT" <<'PY'
import sys, yaml
from axolotl_ila.cli.quickstart import quickstart_config
from axolotl_ila.cli.workspace import build_workspace
out = sys.argv[1]
build_workspace(f"{out}/tiny", "llama", rows=512)
cfg = quickstart_config(f"{out}/tiny")
cfg.update(max_steps=200, logging_steps=1)
open(f"{out}/tiny/config.yml", "w").write(yaml.safe_dump(cfg, sort_keys=False))
PY
echo "== search cost (tiny Llama, 4 blocks, CPU)"
python -m benchmarks.search_cost.tiny --config "$OUT/tiny/config.yml" --workdir "$OUT/search-cost"
echo "== memory and step time (random Llama-shaped, 8 blocks x 256 hidden, CPU)"
python -m benchmarks.memory_speed.run --model random-llama-tiny --strategy random --device cpu --adapters lora,qlora --seq 256 --batch 4 --steps 5
