"""Loading the base model the way training loaded it (dtype, quantization, attention,
resized embeddings), so that evaluation and conversion see the same weights."""

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from shardtune.inputs.sources import model_path
from shardtune.plan.attention import load_dtype_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


def load_dtype(settings):
    """The torch dtype the base weights load in (see load_dtype_name)."""
    return DTYPES[load_dtype_name(settings)]


def quantization_config(q):
    if not q["load_in_4bit"]:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q["bnb_4bit_quant_type"],
        bnb_4bit_use_double_quant=q["use_nested_quant"],
        bnb_4bit_compute_dtype=DTYPES[q["bnb_4bit_compute_dtype"]],
        bnb_4bit_quant_storage=DTYPES[q["bnb_4bit_quant_storage_dtype"]],
    )


def load_base_model(model_dir, settings, vocab_size, attn="sdpa", empty=False, **kwargs):
    """The base model as training saw it, embeddings resized to `vocab_size` if tokens were added.
    `empty`: parameters on the meta device, nothing read from disk, buffers (rotary
    frequencies) computed for real, for a rank that receives its weights from rank 0 when FSDP
    wraps the model (cpu_ram_efficient_loading)."""
    q = settings["quantization"]
    if empty:
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path(model_dir))
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=load_dtype(settings), attn_implementation=attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_path(model_dir),
            dtype=load_dtype(settings),
            attn_implementation=attn,
            quantization_config=quantization_config(q),
            **kwargs,
        )
    if vocab_size > model.get_input_embeddings().num_embeddings:
        # the new rows' values are rank 0's too when `empty`: mean resizing needs real weights
        mean = not q["load_in_4bit"] and not empty
        model.resize_token_embeddings(vocab_size, pad_to_multiple_of=8, mean_resizing=mean)
    model.config.use_cache = False  # a cache would let packed sequences attend across boundaries
    return keep_4bit_cpu_path(model)


def keep_4bit_cpu_path(model):
    """On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights for a faster inference kernel,
    which fails when in_features is not a multiple of the quant block size (the built-in
    model's 352); keep its ordinary path, the one training used."""
    import bitsandbytes

    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def packed_position_ids(seq_lengths):
    """Position ids that restart at 0 for every packed sequence."""
    return torch.cat([torch.arange(n) for n in seq_lengths])
