#!/usr/bin/env bash
# The stored measurement that Chapter 2's text discusses: timings (with peak memory and FLOPs) of one training step
# of every method, written as gradreg.bench JSON into chapters/results/02_cost/. Every file records its machine
# (device, threads, torch, load average before and after). Run it on a quiet machine, from the repository root:
#
#     PYTHONPATH=$PWD .venv/bin/python -m gradreg.bench --help      # what the options mean
#     bash scripts/measure_chapter2.sh                              # about two minutes on one CPU core
#
# then re-execute the chapter (scripts/execute_notebooks.py chapters/02_cost_of_gr.ipynb): its asserts check what
# the text says against these files. THREADS (default 1) and PYTHON (default .venv/bin/python) can be set.
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
THREADS=${THREADS:-1}
OUT=chapters/results/02_cost
mkdir -p "$OUT"
bench() { "$PYTHON" -m gradreg.bench --threads "$THREADS" --no-progress --device cpu "$@"; }
for depth in 2 4 8 16; do   # §2.2: the MLP depth sweep at batch 128
  bench --model mlp --depth "$depth" --batch-size 128 --repeats 20 --warmup 3 --no-flops --json "$OUT/mlp-depth$depth.json"
done
# §2.3: where F-GR's time goes, against two plain passes
bench --breakdown --model mlp --depth 8 --batch-size 128 --repeats 25 --warmup 3 --json "$OUT/breakdown-mlp-depth8.json"
# §2.5: ResNet-18 at the CPU size of the chapter
bench --model resnet18 --batch-size 8 --repeats 8 --warmup 1 --methods sgd,two-passes,forward,double,func-db \
  --json "$OUT/resnet18-batch8.json"
# §2.6: the transformer with the unfused attention kernel, where every method runs
bench --model transformer --attention math --batch-size 8 --seq-len 64 --repeats 10 --warmup 1 \
  --json "$OUT/transformer-math-batch8.json"
