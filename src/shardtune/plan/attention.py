"""Which attention implementation training uses, decided the same way in the launcher (to say
it on the console) and in every rank."""

from shardtune.errors import UserError


def attention_implementation(requested):
    """flash_attention_2 where flash-attn and a GPU are there, otherwise sdpa; says why."""
    import importlib.util

    import torch

    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        if has_flash and torch.cuda.is_available():
            return "flash_attention_2", "flash-attn is installed and a GPU is visible"
        return "sdpa", "no GPU visible" if not torch.cuda.is_available() else "flash-attn is not installed"
    if requested == "flash_attention_2" and not (has_flash and torch.cuda.is_available()):
        raise UserError("model.attn_implementation: flash_attention_2 needs flash-attn and a GPU")
    return requested, "set in model.attn_implementation"
