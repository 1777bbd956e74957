"""Which attention implementation training uses, decided with the dtype it computes in, the
same way in the launcher (to say it on the console), at validation and in every rank."""

from shardtune.errors import UserError

HALF = ("bfloat16", "float16")


def load_dtype_name(s):
    """The dtype the base weights load in: model.dtype, else the quant storage dtype for QLoRA
    (FSDP flattens the 4-bit weights packed into it), else float32."""
    q = s["quantization"]
    if s["model"]["dtype"] != "auto":
        return s["model"]["dtype"]
    return q["bnb_4bit_quant_storage_dtype"] if q["load_in_4bit"] else "float32"


def compute_dtype_name(s):
    """The dtype attention's inputs arrive in: the Trainer's bf16/fp16 (autocast, FSDP's mixed
    precision) if on, else the load dtype."""
    t, f = s["training"], s["fsdp"]
    if f["mixed_precision"] == "bf16" if t["bf16"] is None else t["bf16"]:
        return "bfloat16"
    if f["mixed_precision"] == "fp16" if t["fp16"] is None else t["fp16"]:
        return "float16"
    return load_dtype_name(s)


def decide(requested, compute, has_flash, has_gpu):
    """(implementation, why). flash-attn runs on a GPU in bf16/fp16 only: `auto` takes it
    when all three hold, else sdpa; asking for it where it cannot run is refused."""
    missing = [
        why
        for why, ok in (
            ("flash-attn is not installed", has_flash),
            ("no GPU visible", has_gpu),
            (f"the run computes in {compute} (flash-attn needs bfloat16 or float16)", compute in HALF),
        )
        if not ok
    ]
    if requested == "auto":
        if not missing:
            return "flash_attention_2", f"flash-attn is installed, a GPU is visible and the run computes in {compute}"
        return "sdpa", "; ".join(missing)
    if requested == "flash_attention_2" and missing:
        raise UserError(f"model.attn_implementation: flash_attention_2 cannot run here: {'; '.join(missing)}")
    return requested, "set in model.attn_implementation"


def attention_implementation(settings):
    """decide() for this machine."""
    import importlib.util

    import torch

    requested = settings["model"]["attn_implementation"]
    has_flash = importlib.util.find_spec("flash_attn") is not None
    return decide(requested, compute_dtype_name(settings), has_flash, torch.cuda.is_available())
