"""Rendering rows with the chat template (assistant spans recorded) and tokenizing them in
large batches with the fast tokenizer."""

import itertools

import numpy as np
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from shardtune.data.formats import CONVERTERS, parse_json_text
from shardtune.data.templates import FORMAT_EOS, FORMAT_TOKENS, chat_template, template_line
from shardtune.errors import DataError
from shardtune.inputs.sources import model_path

IGNORE_INDEX = -100

RENDER_BATCH = 1000

TOKENIZE_CHUNK = 1024  # rows per encode_batch call: enough for the Rust threads, bounded memory

TEMPLATE_ERROR = "chat template error"


def render_batch(batch, *, fmt, fields, template, template_kwargs, with_spans=True, json_columns=()):
    """datasets.map function: one batch of raw rows -> text, assistant char spans, reason.
    `json_columns` hold JSON text (see json_text_columns)."""
    n = len(batch[next(iter(fields.values()))])
    texts, spans, reasons = [""] * n, [[] for _ in range(n)], [""] * n
    if fmt == "text":
        for i, value in enumerate(batch[fields["text"]]):
            if not isinstance(value, str):
                reasons[i] = f"missing or empty messages: {fields['text']} is {type(value).__name__}, not text"
            elif not value:
                reasons[i] = f"missing or empty messages: {fields['text']} is empty"
            else:
                texts[i] = value
        return {"text": texts, "spans": spans, "reason": reasons}

    convs, good = [], []
    for i in range(n):
        values, reason = {}, None
        for field, column in fields.items():
            values[field] = batch[column][i]
            if column in json_columns and isinstance(values[field], str):  # e.g. from CSV
                values[field], reason = parse_json_text(values[field], column)
                if reason:
                    break
        if reason is None:
            conv, reason = CONVERTERS[fmt](values, fields)
        if reason:
            reasons[i] = reason
        else:
            convs.append(conv)
            good.append(i)
    try:
        rendered, indices = render_jinja_template(
            convs, chat_template=template, return_assistant_tokens_mask=with_spans, **template_kwargs
        )
    except Exception:  # a template that raises (e.g. roles must alternate): find the rows one by one
        rendered, indices, kept = [], [], []
        for i, conv in zip(good, convs):
            try:
                text, idx = render_jinja_template(
                    [conv], chat_template=template, return_assistant_tokens_mask=with_spans, **template_kwargs
                )
            except Exception as err:
                line = template_line(err)
                reasons[i] = f"{TEMPLATE_ERROR}: {err}" + (f" (template line {line})" if line else "")
                continue
            rendered += text
            indices += idx
            kept.append(i)
        good = kept
    for i, text, idx in zip(good, rendered, indices if with_spans else [()] * len(good)):
        texts[i] = text
        spans[i] = [pos for span in idx for pos in span]
    return {"text": texts, "spans": spans, "reason": reasons}


def load_tokenizer(model_dir, fmt):
    """The model's fast tokenizer with the chat format's template and special tokens.

    Returns (tokenizer, added) where `added` lists the tokens new to the vocabulary (training
    resizes the embeddings for them)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path(model_dir))
    if not tokenizer.is_fast:
        raise DataError(f"model: the tokenizer of {model_path(model_dir)} has no fast (Rust) version; shardtune needs one")
    template = chat_template(fmt, tokenizer)
    before = len(tokenizer)
    missing = [t for t in FORMAT_TOKENS.get(fmt, []) if t not in tokenizer.added_tokens_encoder]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    added = [t for t in missing if tokenizer.convert_tokens_to_ids(t) >= before]
    if fmt in FORMAT_EOS:
        tokenizer.eos_token = FORMAT_EOS[fmt]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = template
    return tokenizer, added


def _token_ranges(encoding, flat_spans, n_tokens):
    """Token index ranges [start, end) of the tokens overlapping each character span: the same
    tokens as apply_chat_template(..., return_assistant_tokens_mask=True) marks."""
    ranges = []
    for k in range(0, len(flat_spans), 2):
        start, end = flat_spans[k], flat_spans[k + 1]
        first = None
        for char in range(start, end):  # the first char that belongs to a token
            first = encoding.char_to_token(char)
            if first is not None:
                break
        if first is None:
            continue
        last = None
        for char in range(end - 1, start - 1, -1):
            last = encoding.char_to_token(char)
            if last is not None:
                break
        # Several byte-level tokens can share the last character: take them all.
        while last + 1 < n_tokens:
            offsets = encoding.token_to_chars(last + 1)
            if offsets is None or offsets[0] >= end or offsets[1] <= offsets[0]:
                break
            last += 1
        ranges.append((first, last + 1))
    return ranges


def _pylist(values):
    return values.to_pylist() if hasattr(values, "to_pylist") else list(values)


def tokenize_rendered(texts, spans, tokenizer, *, add_special_tokens=False, progress=None):
    """Tokenize rendered texts in chunks; return (lengths, flat ids, flat assistant mask).

    `texts` and `spans` (flat [start, end, ...] character spans per text, or None for no mask)
    may be Python lists or Arrow arrays, converted one chunk at a time."""
    backend = tokenizer.backend_tokenizer
    lengths, ids, masks = [], [], []
    for begin in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = _pylist(texts[begin : begin + TOKENIZE_CHUNK])
        # Without masks no offsets are needed: encode_batch_fast skips them (about 10% faster).
        encode = backend.encode_batch if spans is not None else backend.encode_batch_fast
        encodings = encode(chunk, add_special_tokens=add_special_tokens)
        lens = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
        total = int(lens.sum())
        lengths.append(lens)
        ids.append(np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=total))
        if spans is not None:
            # Assistant mask as +1/-1 marks at range ends, summed up (no per-token Python).
            marks = np.zeros(total + 1, dtype=np.int32)
            base = 0
            for encoding, n, flat_spans in zip(encodings, lens.tolist(), _pylist(spans[begin : begin + TOKENIZE_CHUNK])):
                for first, stop in _token_ranges(encoding, flat_spans, n):
                    marks[base + first] += 1
                    marks[base + stop] -= 1
                base += n
            masks.append(np.cumsum(marks[:-1]) > 0)
        del encodings
        if progress is not None:
            progress.update(len(chunk))
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    mask = (np.concatenate(masks) if masks else np.zeros(0, bool)) if spans is not None else None
    return lengths, ids, mask
