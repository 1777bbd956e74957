"""shardtune: LoRA / QLoRA fine-tuning under FSDP as a reproducible Snakemake workflow."""

import logging
import warnings

__version__ = "0.1.0"

# bitsandbytes' CPU backend tries, on import, to fetch an optional kernel from the Hub with the
# `kernels` package and warns in every process when it cannot; its own CPU path is what runs.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# transformers 5 renamed gradient checkpointing to activation checkpointing; TRL and PEFT still
# read the old names, warning in every step and on every rank: nothing a user can act on.
warnings.filterwarnings("ignore", r"`(is_)?gradient_checkpointing(_kwargs)?` is deprecated", FutureWarning)
