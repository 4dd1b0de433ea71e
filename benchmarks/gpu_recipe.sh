#!/usr/bin/env bash
# The whole REALM recipe on one GPU, in stages that each fit a 10-minute slot:
#   bash benchmarks/gpu_recipe.sh pretrain [--set ...]  ICT warm start, then REALM pre-training with asynchronous refresh
#   bash benchmarks/gpu_recipe.sh qa a,b,c,d    open-domain QA variants (benchmarks/openqa_quality.py), all test questions
#   bash benchmarks/gpu_recipe.sh qa-table b,c  the README table's QA recipe (configs/openqa_cpu.toml, one epoch) on
#                                               these runs, then every test question at k = 24 (the table's k for b-d)
# Presets: configs/pretrain_gpu.toml and configs/openqa_gpu.toml (bf16 autocast); runs go to runs/gpu.
# REALM and PY name the CLI and the Python to use (default: the project's virtual environment).
set -euo pipefail
REALM=${REALM:-.venv/bin/realm}
PY=${PY:-.venv/bin/python}
stage=${1:?usage: gpu_recipe.sh pretrain | qa VARIANTS | qa-table VARIANTS}
case "$stage" in
  pretrain)
    $REALM ict --config configs/pretrain_gpu.toml "${@:2}"
    $REALM pretrain --config configs/pretrain_gpu.toml "${@:2}" ;;
  qa)
    $PY benchmarks/openqa_quality.py --config configs/openqa_gpu.toml --runs runs/gpu --variants "${2:-a,b,c,d}" \
      --test-every 1 --dev-every 4 --int8 "" --name "openqa_quality_gpu_$(echo ${2:-a,b,c,d} | tr -d ,)" "${@:3}" ;;
  qa-table)
    variants=${2:-b,c}
    $PY benchmarks/openqa_quality.py --runs runs/gpu --variants "$variants" --test-every 1 --dev-every 4 --int8 none \
      --fp32-check none --set finetune.steps=743 --set finetune.warmup_steps=74 --set runtime.threads=0 \
      --name "openqa_epoch_gpu_$(echo $variants | tr -d ,)" "${@:3}"
    for v in ${variants//,/ }; do
      $REALM eval qa --config configs/openqa_cpu.toml --from runs/gpu/qa-$v --split test --set reader.top_k=24 \
        --set runtime.threads=0 --predictions runs/gpu/qa-$v/predictions-test-k24.jsonl
    done ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
