"""Publishing to the Hugging Face Hub: commits, verification, model cards, pushes while training."""
