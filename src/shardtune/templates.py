"""Chat templates by name. Each marks assistant output with {% generation %} so that the
assistant-only loss mask comes from the template itself (transformers' own mechanism)."""

from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TOKENS = {"bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|endoftext|>"}

ZEPHYR = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
ZEPHYR_TOKENS = {"bos": "<s>", "eos": "</s>", "pad": "</s>"}

# Special tokens each format needs in the vocabulary (added when missing).
FORMAT_TOKENS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "zephyr": ["<|system|>", "<|user|>", "<|assistant|>"],
}


def chat_template(fmt, tokenizer=None):
    """The Jinja template for `fmt`: a named format, 'tokenizer' (the model's own), or a file."""
    if fmt == "chatml":
        return CHATML
    if fmt == "zephyr":
        return ZEPHYR
    if fmt == "tokenizer":
        if tokenizer is None or not tokenizer.chat_template:
            raise ValueError("data.chat_template_format: 'tokenizer' but the model's tokenizer has no chat template")
        return tokenizer.chat_template
    path = Path(fmt)
    if not path.is_file():
        raise ValueError(f"data.chat_template_format: {fmt!r} is neither chatml, zephyr, tokenizer nor a file")
    return path.read_text()
