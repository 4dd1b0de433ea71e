#!/usr/bin/env bash
# The whole REALM recipe on one GPU, in two stages that each fit a 10-minute slot:
#   bash benchmarks/gpu_recipe.sh pretrain [--set ...]  ICT warm start, then REALM pre-training with asynchronous refresh
#   bash benchmarks/gpu_recipe.sh qa a,b,c,d    open-domain QA variants (benchmarks/openqa_quality.py), all test questions
# Presets: configs/pretrain_gpu.toml and configs/openqa_gpu.toml (bf16 autocast); runs go to runs/gpu.
# REALM and PY name the CLI and the Python to use (default: the project's virtual environment).
set -euo pipefail
REALM=${REALM:-.venv/bin/realm}
PY=${PY:-.venv/bin/python}
stage=${1:?usage: gpu_recipe.sh pretrain | qa VARIANTS}
case "$stage" in
  pretrain)
    $REALM ict --config configs/pretrain_gpu.toml "${@:2}"
    $REALM pretrain --config configs/pretrain_gpu.toml "${@:2}" ;;
  qa)
    $PY benchmarks/openqa_quality.py --config configs/openqa_gpu.toml --runs runs/gpu --variants "${2:-a,b,c,d}" \
      --test-every 1 --dev-every 4 --int8 "" --name "openqa_quality_gpu_$(echo ${2:-a,b,c,d} | tr -d ,)" "${@:3}" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
