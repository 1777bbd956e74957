#!/usr/bin/env bash
# Every figure of BENCHMARKS.md, in order, with the commands written there. Run from the
# repository root with the project's venv active; results land in build/bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
uptime
python bench/throughput.py --model small --steps 8 --warmup 2 --repeats 2 --paths ours,reference,ours-per-row
python bench/autobatch.py
python bench/sharding_memory.py --paths ours,ours-malloc-trim,reference-ddp,reference-fsdp
python bench/snakemake_overhead.py
python bench/estimator_accuracy.py
python bench/attention_micro.py
python bench/gpu_mfu.py --plan
uptime
