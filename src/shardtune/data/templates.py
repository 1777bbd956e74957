"""Chat templates by name. The named ones render like the recipe's (PEFT examples/sft) and
also mark assistant output with {% generation %}, so that the assistant-only loss mask comes
from the template itself (transformers' own mechanism)."""

import re
from pathlib import Path

from shardtune.errors import DataError

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
# The token that ends an assistant turn becomes the tokenizer's EOS (as in the recipe), so
# that generation stops there.
FORMAT_EOS = {"chatml": "<|im_end|>"}

GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_block(template):
    """Whether `template` marks assistant output with {% generation %} (needed for masks)."""
    return bool(GENERATION_BLOCK.search(template or ""))


def template_name(fmt):
    """How messages name the template of `fmt`."""
    return "tokenizer (the model's own template)" if fmt == "tokenizer" else fmt


def template_line(err):
    """The template line a render error was raised at (Jinja puts it in the traceback), or None."""
    line, tb = None, err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _compiled(template, fmt):
    """`template`, compiled as transformers compiles it: a syntax error stops here, before any row."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template


    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as err:
        raise DataError(
            f"data.chat_template_format: {template_name(fmt)}: line {err.lineno}: Jinja syntax error: {err.message}"
        ) from None
    return template


def chat_template(fmt, tokenizer=None):
    """The Jinja template for `fmt`: a named format, 'tokenizer' (the model's own), or a file."""

    if fmt == "chatml":
        return CHATML
    if fmt == "zephyr":
        return ZEPHYR
    if fmt == "tokenizer":
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
        if not template:
            raise DataError("data.chat_template_format: 'tokenizer' but the model's tokenizer has no chat template")
        return _compiled(template, fmt)
    path = Path(fmt)
    if not path.is_file():
        raise DataError(f"data.chat_template_format: {fmt!r} is neither chatml, zephyr, tokenizer nor an existing file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"data.chat_template_format: {fmt} is empty")
    return _compiled(text, fmt)
