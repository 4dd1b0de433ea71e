#!/bin/bash
# The paper's fine-tuning recipe: the reader reads all k = 5 retrieved blocks while training (reader_blocks = 0),
# against the CPU preset's 2. Same starting runs as the 480-step table (runs/cpu-scale-pt).
cd /work/main
.venv/bin/python benchmarks/openqa_quality.py --runs runs/cpu-rb5 --variants d,c,a,b \
  --set finetune.steps=480 --set finetune.warmup_steps=48 --set finetune.reader_blocks=0 \
  --int8 none --fp32-check none --reuse --name openqa_quality_reader_blocks5
