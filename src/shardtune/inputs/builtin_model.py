"""The built-in base model: a tiny Llama-architecture causal LM and a byte-level BPE
tokenizer trained on the built-in data, both built deterministically from a seed."""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from shardtune.data.templates import CHATML, CHATML_TOKENS
from shardtune.inputs.builtin_data import build_conversations


def build_tokenizer(vocab_size, seed):
    rows = build_conversations(2000, seed)
    corpus = [m["content"] for row in rows for m in row["messages"]] + ["system user assistant"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [CHATML_TOKENS["pad"], CHATML_TOKENS["bos"], CHATML_TOKENS["eos"]]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=CHATML_TOKENS["bos"],
        eos_token=CHATML_TOKENS["eos"],
        pad_token=CHATML_TOKENS["pad"],
        unk_token=None,
        chat_template=CHATML,
        model_max_length=4096,
    )


def build_model(out_dir, spec):
    """Write tokenizer + randomly initialised Llama model to `out_dir`; `spec` is model.builtin
    (an optional `config_vocab` gives an embedding table larger than the tokenizer)."""
    tokenizer = build_tokenizer(spec["vocab_size"], spec["seed"])
    config = LlamaConfig(
        vocab_size=max(len(tokenizer), spec.get("config_vocab", 0)),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())
