"""shardtune: LoRA / QLoRA fine-tuning under FSDP as a reproducible Snakemake workflow."""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend tries, on import, to fetch an optional kernel from the Hub with the
# `kernels` package and warns in every process when it cannot; its own CPU path is what runs.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
