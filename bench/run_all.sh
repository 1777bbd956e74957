#!/usr/bin/env bash
# Every figure of BENCHMARKS.md, in order, with the commands written there. Run from the
# repository root with the project's venv active; results land in build/bench/. About 80
# minutes on 2 shared cores (the recipe at batch 8 in autobatch.py alone takes ~16).
set -euo pipefail
cd "$(dirname "$0")/.."
uptime
python bench/throughput.py --model small --steps 8 --warmup 2 --repeats 2 --paths ours,reference,ours-per-row
python bench/throughput.py --model small --steps 6 --warmup 2 --repeats 1 --paths ours,reference-sdpa --tag throughput-sdpa
python bench/autobatch.py --recipe-accumulation 1 --steps 3 --warmup 1 --repeats 2
python bench/sharding_memory.py --paths reference-ddp,ours,ours-malloc-trim,reference-fsdp,ours-no-shard-setting  # the last is now refused by the config
python bench/sharding_memory.py --paths reference-ddp,ours,ours-mmap-threshold --out build/bench/sharding-deep-mmap.json
python bench/sharding_memory.py --paths reference-ddp,ours-mmap-threshold-while-loading --steps 3 --out build/bench/sharding-deep-mmap-load.json
python bench/sharding_memory.py --paths reference-ddp,ours-mmap-threshold-4m --steps 3 --out build/bench/sharding-deep-mmap-4m.json
python bench/throughput.py --model small --steps 6 --warmup 2 --repeats 2 --paths ours,ours-mmap-threshold --tag throughput-mmap
python bench/throughput.py --model small --steps 6 --warmup 2 --repeats 2 --paths ours,ours-mmap-threshold-while-loading --tag throughput-mmap-load
python bench/throughput.py --model small --steps 6 --warmup 2 --repeats 2 --paths ours,ours-mmap-threshold-4m --tag throughput-mmap-4m
python bench/snakemake_overhead.py
python bench/estimator_accuracy.py
python bench/attention_micro.py --batch 2
python bench/attention_micro.py --batch 8
python bench/profile_step.py --batch 2 --layout flattened
python bench/profile_step.py --batch 2 --layout per-row
python bench/profile_step.py --batch 8 --layout flattened
python bench/profile_step.py --batch 8 --layout per-row
python bench/gpu_mfu.py --plan
uptime
