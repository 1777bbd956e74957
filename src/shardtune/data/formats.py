"""Row formats (messages, ShareGPT, prompt/completion, text): which one a split is, and each
row checked and turned into messages; a bad row gets a reason, never a silent change."""

import json

import datasets

from shardtune.errors import DataError
from shardtune.inputs.sources import ROW_COLUMN

ROLES = ("system", "user", "assistant")

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

FORMAT_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


def resolve_format(column_names, cfg, where):
    """Return (format, {field: column}) for a split with `column_names`."""
    names = [c for c in column_names if c != ROW_COLUMN]
    has = ", ".join(names) or "no columns"
    mapping = cfg.get("columns") or {}
    for field, column in mapping.items():
        if column not in names:
            raise DataError(f"data.columns.{field}: no column '{column}' in {where} (has: {has})")

    def column(field):
        return mapping.get(field, field)

    fmt = cfg.get("format", "auto")
    if fmt == "auto":
        fmt = next((f for f, fields in FORMAT_FIELDS.items() if all(column(x) in names for x in fields)), None)
        if fmt is None:
            raise DataError(
                f"data.format: cannot tell the format of {where}: no column messages, conversations, "
                f"prompt + completion or text (has: {has}); name yours with data.columns"
            )
    else:
        for field in FORMAT_FIELDS[fmt]:
            if column(field) not in names:
                raise DataError(
                    f"data.format: {fmt} needs a '{column(field)}' column in {where} (has: {has}); "
                    f"map yours with data.columns.{field}"
                )
    return fmt, {field: column(field) for field in FORMAT_FIELDS[fmt]}


def _check_messages(messages, field):
    """Return (clean messages, None) or (None, reason). A reason is 'kind: detail'."""
    if messages is None:
        return None, f"missing or empty messages: no {field}"
    if not isinstance(messages, list):
        return None, f"missing or empty messages: {field} is a {type(messages).__name__}, not a list"
    if not messages:
        return None, f"missing or empty messages: {field} is empty"
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return None, f"malformed message: {field}[{i}] is a {type(message).__name__}, not an object"
        role, content = message.get("role"), message.get("content")
        if role is None:
            return None, f"malformed message: {field}[{i}] has no role"
        if role not in ROLES:
            return None, f"unknown role: {field}[{i}] has role {role!r} (allowed: {', '.join(ROLES)})"
        if content is None:
            return None, f"malformed message: {field}[{i}] has no content"
        if not isinstance(content, str):
            return None, f"non-string content: {field}[{i}] ({role}) has {type(content).__name__} content"
        # As apply_chat_template does: keys without a value are not passed to the template.
        clean.append({k: v for k, v in message.items() if v is not None})
    if not any(m["role"] == "assistant" for m in clean):
        return None, f"no assistant turn: {field} has no assistant message"
    return clean, None


def _from_messages(values, fields):
    return _check_messages(values["messages"], fields["messages"])


def _from_sharegpt(values, fields):
    field, turns = fields["conversations"], values["conversations"]
    if not isinstance(turns, list):
        return _check_messages(turns, field)
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return None, f"malformed message: {field}[{i}] is a {type(turn).__name__}, not an object"
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            return None, f"unknown role: {field}[{i}] has from {speaker!r} (allowed: human, gpt, system)"
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    return _check_messages(messages, field)


def _from_prompt_completion(values, fields):
    prompt, completion = values["prompt"], values["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return _check_messages(messages, f"{fields['prompt']}/{fields['completion']}")
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt-completion
        return _check_messages(prompt + completion, f"{fields['prompt']}+{fields['completion']}")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            return None, f"missing or empty messages: no {fields[name]}"
    return None, (
        f"non-string content: {fields['prompt']} and {fields['completion']} must both be strings "
        f"or both message lists (got {type(prompt).__name__} and {type(completion).__name__})"
    )


CONVERTERS = {"messages": _from_messages, "sharegpt": _from_sharegpt, "prompt_completion": _from_prompt_completion}


def json_text_columns(features, fmt, fields):
    """The columns whose text is parsed as JSON per row: a messages or conversations column
    stored as text (e.g. from CSV). In a column of mixed types (datasets' Json) every value is
    kept as the file wrote it: a string there stays a string."""
    if fmt in ("prompt_completion", "text"):
        return set()
    text = (datasets.Value("string"), datasets.Value("large_string"))
    return {column for column in fields.values() if features.get(column) in text}


def parse_json_text(value, field):
    if not isinstance(value, str):
        return value, None
    try:
        return json.loads(value), None
    except json.JSONDecodeError as err:
        return None, f"invalid JSON: {field} holds text that is not JSON ({err.msg})"
