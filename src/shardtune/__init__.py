"""shardtune: LoRA / QLoRA fine-tuning under FSDP as a reproducible Snakemake workflow."""

__version__ = "0.1.0"
