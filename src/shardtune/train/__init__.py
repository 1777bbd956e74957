"""Training: the entry point ranks run, its trainer arguments, callbacks and checkpoints."""
