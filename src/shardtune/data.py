"""Data preparation: check every row, render it with the chat template, tokenize in large
batches with the fast tokenizer, mask non-assistant tokens, and pack with best-fit
decreasing (the bins of TRL's `pack_dataset`), keeping sequence boundaries as `seq_lengths`.

Per split:
1. render and tokenize, in `num_proc` forked worker processes over contiguous shares of the
   rows (or in this process for a small split): convert each row's format to messages, check
   it, render it with the Jinja template, recording the character spans of assistant output
   ({% generation %} blocks) and, for a bad row, the reason; then `encode_batch` of the fast
   tokenizer (one thread per worker; in this process its Rust threads use every core),
   assistant spans mapped to tokens with `char_to_token`, and token ids and masks as numpy
   arrays, sent back to this process in row order;
2. in this process: labels, truncation and EOS appends as numpy operations on flat arrays,
   then best-fit decreasing packing with numpy, straight into Arrow list arrays.
"""

import itertools
import json
import multiprocessing
import os
import time
from bisect import bisect_left, insort
from collections import Counter, defaultdict, deque
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import xxhash  # a dependency of datasets
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from .errors import UserError
from .io import atomic_dir, read_json, write_json
from .sources import ROW_COLUMN, model_path
from .templates import FORMAT_EOS, FORMAT_TOKENS, chat_template, has_generation_block, template_line, template_name

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
IGNORE_INDEX = -100
FORMAT_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
RENDER_BATCH = 1000
TOKENIZE_CHUNK = 1024  # rows per encode_batch call: enough for the Rust threads, bounded memory
WORKER_MIN_ROWS = 1000  # a worker process for fewer rows than this is not worth its start
TASKS_PER_WORKER = 8  # shares per worker: less time with one worker idle at the end
PROBE_ROWS = 16  # rendered first: when all fail alike, the template is at fault, not the rows
TEMPLATE_ERROR = "chat template error"


class DataError(UserError):
    """A bad row or a data setting that cannot work; the message names the row."""


# --- formats -------------------------------------------------------------------------------


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


def _parse_json_text(value, field):
    if not isinstance(value, str):
        return value, None
    try:
        return json.loads(value), None
    except json.JSONDecodeError as err:
        return None, f"invalid JSON: {field} holds text that is not JSON ({err.msg})"


def _render_batch(batch, *, fmt, fields, template, template_kwargs, with_spans=True, json_columns=()):
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
                values[field], reason = _parse_json_text(values[field], column)
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


# --- tokenizer -----------------------------------------------------------------------------


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


# --- workers -------------------------------------------------------------------------------

_JOB = None  # what the worker processes read: set before they are forked, inherited by them


def _prepare_rows(ds, lo, hi, *, render, tokenizer, add_special_tokens, assistant_only, stop_on_bad, stop):
    """Render, check and tokenize rows [lo, hi) of `ds` (a worker's share, or the whole split).

    Returns a dict: `bad` [(position, source row, reason)], and for the good rows `rows` (source
    row numbers), `lengths`, `ids`, `mask` (None without assistant-only loss), plus the seconds
    spent rendering and tokenizing. Tokenizing is skipped (`ids` None) once a bad row is known
    and on_bad_row is 'error': the split stops anyway, but every row is still checked so that
    the message can count them."""
    start = time.perf_counter()
    texts, spans, rows, bad = [], [], [], []
    for begin in range(lo, hi, RENDER_BATCH):
        end = min(begin + RENDER_BATCH, hi)
        batch = ds[begin:end]
        out = _render_batch(batch, **render)
        numbers = batch[ROW_COLUMN] if ROW_COLUMN in batch else range(begin, end)  # source rows
        for i, (row, text, span, reason) in enumerate(zip(numbers, out["text"], out["spans"], out["reason"])):
            if reason:
                bad.append((begin + i, row, reason))
            else:
                texts.append(text)
                spans.append(span)
                rows.append(row)
    rendered = time.perf_counter()
    result = {"bad": bad, "rows": np.array(rows, dtype=np.int64), "ids": None, "render_s": rendered - start, "tokenize_s": 0.0}
    if stop_on_bad and bad and stop is not None:
        stop.set()
    if stop_on_bad and (bad or (stop is not None and stop.is_set())):
        return result
    del batch, out
    lengths, ids, mask = tokenize_rendered(
        texts, spans if assistant_only else None, tokenizer, add_special_tokens=add_special_tokens
    )
    result.update(lengths=lengths, ids=ids, mask=mask, tokenize_s=time.perf_counter() - rendered)
    return result


def _worker_start():
    # The fast tokenizer runs on this worker's one thread; its Rust thread pool, if the parent
    # started one, does not exist in a forked child (and would oversubscribe the cores).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _worker_task(bounds):
    ds, kwargs = _JOB
    return _prepare_rows(ds, *bounds, **kwargs)


def _run_workers(ds, workers, kwargs, progress):
    """Yield _prepare_rows results for contiguous shares of `ds`, in row order: the whole split
    in this process when `workers` is 1, else TASKS_PER_WORKER shares per forked worker."""
    n = len(ds)
    if workers == 1:
        result = _prepare_rows(ds, 0, n, **kwargs, stop=None)
        progress.update(n)
        yield result
        return
    global _JOB
    edges = np.linspace(0, n, workers * TASKS_PER_WORKER + 1).astype(int).tolist()
    tasks = [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
    context = multiprocessing.get_context("fork")  # the children inherit the data set and tokenizer
    _JOB = (ds, {**kwargs, "stop": context.Event()})
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # while forking: no "just got forked" warning
    try:
        pool = context.Pool(workers, initializer=_worker_start)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    try:
        for (lo, hi), result in zip(tasks, pool.imap(_worker_task, tasks)):
            progress.update(hi - lo)
            yield result
        pool.close()
        pool.join()
    finally:
        pool.terminate()
        _JOB = None


def _pack_bfd(lengths, max_len):
    """Best-fit decreasing bins, the same as TRL's pack_dataset(strategy="bfd") makes (longest
    first, ties in row order; each sequence goes to the bin with the least room that fits it,
    the oldest such bin; else a new bin). Returns (sequence order, sequences per bin)."""
    order = np.argsort(-lengths, kind="stable")
    spaces = []  # sorted: the room left in some bin (0 < room < max_len)
    bins_by_space = defaultdict(deque)
    members = []
    for index, length in zip(order.tolist(), lengths[order].tolist()):
        k = bisect_left(spaces, length)
        if k < len(spaces):
            space = spaces[k]
            waiting = bins_by_space[space]
            b = waiting.popleft()
            if not waiting:
                del spaces[k]
        else:
            space, b = max_len, len(members)
            members.append([])
        members[b].append(index)
        space -= length
        if space > 0:
            waiting = bins_by_space[space]
            if not waiting:
                insort(spaces, space)
            waiting.append(b)
    sequence_order = np.fromiter(itertools.chain.from_iterable(members), dtype=np.int64, count=len(lengths))
    return sequence_order, np.fromiter(map(len, members), dtype=np.int64, count=len(members))


def _fingerprint(table):
    """A content hash of an Arrow table for its Dataset: what datasets would compute by
    pickling the whole table, at a fraction of the time (xxhash over the buffers)."""
    digest = xxhash.xxh64(str(table.schema).encode())
    for column in table.columns:
        for chunk in column.chunks:
            for buffer in chunk.buffers():
                digest.update(b"" if buffer is None else buffer)
    return digest.hexdigest()


def _gather(ids, labels, starts, lengths, order):
    """The tokens of sequences `order` (each `lengths[i]` tokens from `starts[i]`), back to back."""
    if len(order) == 0:
        return ids[:0], labels[:0]
    spans = list(zip(starts[order].tolist(), (starts[order] + lengths[order]).tolist()))
    out = np.concatenate([ids[a:b] for a, b in spans])
    if labels is ids:  # full-text loss: labels are the ids
        return out, out
    return out, np.concatenate([labels[a:b] for a, b in spans])


def _rows_table(ids, labels, seq_lengths, per_row):
    """input_ids, labels and seq_lengths as Arrow rows: row i holds the next `per_row[i]`
    sequences of `seq_lengths`, whose tokens lie back to back in ids/labels."""
    row_ends = np.cumsum(per_row)
    row_offsets = np.concatenate([[0], np.cumsum(seq_lengths)[row_ends - 1]])
    list_type = pa.ListArray if len(ids) < 2**31 else pa.LargeListArray
    offset_type = pa.int32() if list_type is pa.ListArray else pa.int64()
    offsets = pa.array(row_offsets, type=offset_type)
    return pa.table(
        {
            "input_ids": list_type.from_arrays(offsets, pa.array(ids)),
            "labels": list_type.from_arrays(offsets, pa.array(labels)),
            "seq_lengths": pa.ListArray.from_arrays(
                pa.array(np.concatenate([[0], row_ends]), type=pa.int32()), pa.array(seq_lengths, type=offset_type)
            ),
        }
    )


def _packed_table(ids, labels, lengths, max_len, starts=None):
    """The table TRL's pack_dataset(..., strategy="bfd") returns for these sequences, built
    with numpy. Sequence i is `lengths[i]` tokens from `starts[i]` (default: back to back)."""
    if starts is None:
        starts = np.cumsum(lengths) - lengths
    keep = lengths > 0  # as TRL: empty sequences are dropped
    lengths, starts = lengths[keep], starts[keep]
    order, per_bin = _pack_bfd(lengths, max_len)
    ids, labels = _gather(ids, labels, starts, lengths, order)
    return _rows_table(ids, labels, lengths[order], per_bin)


# --- per split -----------------------------------------------------------------------------


class _Clock:
    """Wall seconds per phase, for stats.json."""

    def __init__(self):
        self.laps, self.last = {}, time.perf_counter()

    def lap(self, name):
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 3)
        self.last = now


def _kind(reason):
    """The reason's kind, for counting: 'unknown role: messages[2] ...' -> 'unknown role'."""
    return reason.split(":", 1)[0].split(" (", 1)[0]


def _line_of(path, row, skipped_lines):
    """The line number of source row `row` in a JSON-lines file (rows skip blank and bad lines)."""
    try:
        with open(path, encoding="utf-8") as handle:
            seen = -1
            for number, line in enumerate(handle, start=1):
                if line.strip() and number not in skipped_lines:
                    seen += 1
                    if seen == row:
                        return number
    except OSError:
        return None
    return None


class SplitReport:
    """Names rows in messages: the file or hub split they came from and their row number."""

    def __init__(self, split, origin, record):
        self.split, self.origin = split, origin
        self.bad_lines = {b["line"] for b in record.get("bad_lines", []) if b.get("line")}

    def where(self, row):
        origin = self.origin or f"split '{self.split}'"
        path = Path(origin)
        line = _line_of(path, row, self.bad_lines) if path.suffix.lower() == ".jsonl" and path.is_file() else None
        return f"{origin}, row {row}" + (f" (line {line})" if line else "")


def _probe_template(ds, render, fmt_name):
    """Render the first rows; when every one that reaches the template fails with the same
    error, stop with it once (naming the template) instead of as a bad row per row."""
    reasons = _render_batch(ds[:PROBE_ROWS], **render)["reason"]
    reached = [r for r in reasons if not r or r.startswith(TEMPLATE_ERROR)]
    if len(reached) >= 2 and reached[0] and all(r == reached[0] for r in reached):
        error = reached[0][len(TEMPLATE_ERROR) + 2 :]
        raise DataError(
            f"data.chat_template_format: {template_name(fmt_name)}: the template fails on each of the first "
            f"{len(reached)} conversations: {error}"
        )


def _bad_row_error(report, row, reason, others):
    more = f" ({others} more bad row{'s' if others != 1 else ''} in this split)" if others else ""
    return DataError(f"{report.where(row)}: {reason}{more}; set data.on_bad_row: skip to drop such rows")


def prepare_split(ds, split, cfg, tokenizer, *, report, num_proc=1, log=print):
    """Render, check, tokenize, mask and (optionally) pack one split.

    Returns (prepared Dataset, stats dict, lengths array). Raises DataError for a bad row when
    data.on_bad_row is 'error'."""
    max_len, packing = cfg["max_seq_len"], cfg["packing"]
    where = report.origin or f"split '{split}'"
    if len(ds) == 0:
        raise DataError(f"{where}: split '{split}' is empty")
    fmt, fields = resolve_format(ds.column_names, cfg, where)
    template = tokenizer.chat_template
    assistant_only = cfg["assistant_only_loss"] and fmt != "text"
    if assistant_only and not has_generation_block(template):
        raise DataError(
            f"data.assistant_only_loss: the chat template of '{cfg['chat_template_format']}' does not mark "
            "assistant output with {% generation %}; use chatml, zephyr or a Jinja file with "
            "{% generation %} blocks, or set data.assistant_only_loss: false"
        )
    # Without a source row column, rows are numbered by position.
    keep = [*fields.values(), *([ROW_COLUMN] if ROW_COLUMN in ds.column_names else [])]
    ds = ds.select_columns(list(dict.fromkeys(keep))).with_format(None)

    clock = _Clock()
    workers = max(1, min(num_proc, len(ds) // WORKER_MIN_ROWS))
    kwargs = dict(
        render=dict(
            fmt=fmt,
            fields=fields,
            template=template,
            template_kwargs=dict(tokenizer.special_tokens_map),
            with_spans=assistant_only,
            json_columns=json_text_columns(ds.features, fmt, fields),
        ),
        tokenizer=tokenizer,
        add_special_tokens=cfg["add_special_tokens"],
        assistant_only=assistant_only,
        stop_on_bad=cfg["on_bad_row"] == "error",
    )
    if fmt != "text":
        _probe_template(ds, kwargs["render"], cfg["chat_template_format"])
    bad, parts, busy = [], [], Counter()
    progress = datasets.utils.tqdm(total=len(ds), desc=f"render and tokenize {split}", unit=" rows")
    with progress:
        for part in _run_workers(ds, workers, kwargs, progress):
            bad += part["bad"]
            busy["render"] += part["render_s"]
            busy["tokenize"] += part["tokenize_s"]
            parts.append(part)
    dropped = Counter()
    if bad:
        if cfg["on_bad_row"] == "error":
            _, row, reason = bad[0]
            raise _bad_row_error(report, row, reason, len(bad) - 1)
        dropped.update(_kind(reason) for _, _, reason in bad)
    if len(bad) == len(ds):
        raise DataError(f"{where}: no usable conversation left in split '{split}' (dropped: {dict(dropped)})")
    rows = np.concatenate([p["rows"] for p in parts])
    lengths = np.concatenate([p["lengths"] for p in parts])
    ids = np.concatenate([p["ids"] for p in parts])
    mask = np.concatenate([p["mask"] for p in parts]) if assistant_only else None
    del parts
    clock.lap("render_tokenize")
    # int32 halves memory and copying; readers get Python ints, the collator makes int64 tensors.
    labels = np.where(mask, ids, np.int32(IGNORE_INDEX)) if assistant_only else ids

    if packing and cfg["append_concat_token"]:
        # The recipe's concat token: EOS after every sequence, trained on when the whole text is.
        ends = np.cumsum(lengths)
        eos = tokenizer.eos_token_id
        ids, labels = np.insert(ids, ends, eos), np.insert(labels, ends, IGNORE_INDEX if assistant_only else eos)
        lengths = lengths + 1

    too_long = lengths > max_len
    truncated = int(too_long.sum()) if cfg["too_long"] == "truncate" else 0
    keep_row = np.ones(len(lengths), dtype=bool)
    starts = np.cumsum(lengths) - lengths
    kept = lengths  # tokens kept per row: all of them, or the first max_len
    if too_long.any():
        if cfg["too_long"] == "error":
            first = int(np.flatnonzero(too_long)[0])
            raise DataError(
                f"{report.where(int(rows[first]))}: {int(lengths[first])} tokens exceed data.max_seq_len={max_len}"
                f" ({int(too_long.sum()) - 1} more such rows); set data.too_long: truncate or drop, or raise max_seq_len"
            )
        if cfg["too_long"] == "drop":
            keep_row &= ~too_long
            dropped["longer than max_seq_len"] += int(too_long.sum())
        else:
            kept = np.minimum(lengths, max_len)
    if assistant_only:
        # Tokens with loss among each row's kept tokens, from a running count.
        count = np.int32 if len(labels) < 2**31 else np.int64
        before = np.concatenate([[0], np.cumsum((labels != IGNORE_INDEX).view(np.uint8), dtype=count)])  # not bool: 10x slower
        row_loss = before[starts + kept] - before[starts]
        no_loss = keep_row & (row_loss == 0)
        cut, empty = no_loss & too_long, no_loss & ~too_long
        if empty.any():
            if cfg["on_bad_row"] == "error":
                first = int(np.flatnonzero(empty)[0])
                raise _bad_row_error(report, int(rows[first]), "no token carries loss: the assistant output is empty", int(empty.sum()) - 1)
            dropped["no token carries loss"] += int(empty.sum())
        if cut.any():  # the user asked for truncation: count, do not stop
            dropped["no assistant token left after truncation"] += int(cut.sum())
            truncated -= int(cut.sum())
        keep_row &= ~no_loss
        loss_tokens = int(row_loss[keep_row].sum())
    else:
        loss_tokens = int(kept[keep_row].sum())
    contiguous = keep_row.all() and kept is lengths  # the rows' tokens are ids as they are
    starts, lengths = starts[keep_row], kept[keep_row]
    if len(lengths) == 0:
        raise DataError(f"{where}: no usable conversation left in split '{split}' (dropped: {dict(dropped)})")
    del mask
    clock.lap("labels")
    if packing:
        # One BFD pass over the whole split for the best fill.
        table = _packed_table(ids, labels, lengths, max_len, starts=starts)
    else:
        if not contiguous:
            ids, labels = _gather(ids, labels, starts, lengths, np.arange(len(lengths)))
        table = _rows_table(ids, labels, lengths, np.ones(len(lengths), dtype=np.int64))  # one per row
    del ids, labels
    final = datasets.Dataset(table, fingerprint=_fingerprint(table))
    clock.lap("pack")
    total = int(lengths.sum())
    edges = np.linspace(0, max_len, 17)
    counts, _ = np.histogram(lengths, bins=edges)
    stats = {
        "format": fmt,
        "columns": fields,
        "conversations_in": len(ds),
        "conversations_out": int(len(lengths)),
        "dropped": dict(sorted(dropped.items())),
        "truncated": truncated,
        "tokens": total,
        "loss_tokens": loss_tokens,
        "rows": len(final),
        "packing_efficiency": round(total / (len(final) * max_len), 6) if packing else None,
        "length": {"mean": round(float(lengths.mean()), 2), "median": float(np.median(lengths)), "max": int(lengths.max())},
        "length_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "workers": workers,
        "seconds": clock.laps,
        "worker_seconds": {k: round(v, 3) for k, v in busy.items()},
    }
    log(
        f"[{split}] {stats['conversations_out']}/{len(ds)} conversations ({fmt}), {total} tokens, "
        f"{stats['loss_tokens']} with loss -> {len(final)} rows; dropped {dict(dropped) or 0}, truncated {truncated}"
    )
    return final, stats, lengths


def plot_lengths(lengths_by_split, max_len, path):
    """A histogram of conversation lengths (tokens) per split, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    edges = np.linspace(0, max_len, 33)
    for split, lengths in lengths_by_split.items():
        ax.hist(lengths, bins=edges, alpha=0.6, label=f"{split} ({len(lengths)})")
    ax.axvline(max_len, color="black", linestyle="--", linewidth=1, label="max_seq_len")
    ax.set_xlabel("tokens per conversation")
    ax.set_ylabel("conversations")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _load_errors(record, cfg):
    """Rows the source loader could not parse (invalid JSON lines): an error, or counted."""
    bad = record.get("bad_lines", [])
    if bad and cfg["on_bad_row"] == "error":
        first = bad[0]
        at = f"line {first['line']}" if first.get("line") else f"item {first.get('item')}"
        more = f" ({len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
        raise DataError(f"{first['file']}: {at}: {first['reason']}{more}; set data.on_bad_row: skip to drop such rows")
    return dict(Counter(_kind(b["reason"]) for b in bad))


def _dropped_line(stats, stats_path):
    """One line on what was dropped, by split and reason, or None when nothing was."""
    parts = [(split, s["dropped"]) for split, s in stats["splits"].items()] + [("at load", stats["dropped_at_load"])]
    parts = [(where, counts) for where, counts in parts if counts]
    if not parts:
        return None
    total = sum(n for _, counts in parts for n in counts.values())

    def reasons(counts):
        return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    detail = "; ".join(f"{where} {sum(counts.values())} ({reasons(counts)})" for where, counts in parts)
    return f"dropped {total} row{'s' if total != 1 else ''}: {detail}; see {stats_path}"


def prepare(dataset_dir, model_dir, settings, out_dir, log=print, num_proc=None, console=None):
    """Tokenize and pack the fetched data set; write data/ (train, test), tokenizer/,
    stats.json and lengths.png into out_dir, all at once. `console` says a line to the user
    (as well as the log): how many rows were dropped, if any."""
    start = time.perf_counter()
    cfg = {
        "format": "auto",
        "columns": {},
        "add_special_tokens": False,
        "append_concat_token": False,
        "too_long": "truncate",
        "on_bad_row": "error",
        **settings["data"],
    }
    workers = cfg.pop("num_proc", None)  # how, not what: kept out of stats and the cache key
    num_proc = num_proc or workers or os.cpu_count() or 1
    os.environ.setdefault("RAYON_NUM_THREADS", str(num_proc))  # the tokenizer's threads
    tokenizer, added = load_tokenizer(model_dir, cfg["chat_template_format"])
    record_path = Path(dataset_dir) / "source.json"
    record = read_json(record_path) if record_path.is_file() else {}
    raw = datasets.load_from_disk(str(Path(dataset_dir) / "data"))
    missing = [s for s in ("train", "test") if s not in raw]
    if missing:
        raise DataError(f"{dataset_dir}: the fetched data set has no split '{missing[0]}'")
    stats = {
        "settings": cfg,
        "added_tokens": added,
        "tokenizer": {
            "size": len(tokenizer),
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
        },
        "dropped_at_load": _load_errors(record, cfg),
        "splits": {},
    }
    prepared, lengths = {}, {}
    for split in ("train", "test"):
        report = SplitReport(split, record.get("origin", {}).get(split), record)
        prepared[split], stats["splits"][split], lengths[split] = prepare_split(
            raw[split],
            split,
            cfg,
            tokenizer,
            report=report,
            num_proc=num_proc,
            log=log,
        )
    stats["format"] = stats["splits"]["train"]["format"]
    stats["seconds"] = round(time.perf_counter() - start, 3)  # before writing
    with atomic_dir(out_dir) as tmp:
        datasets.DatasetDict(prepared).save_to_disk(str(tmp / "data"))
        tokenizer.save_pretrained(tmp / "tokenizer")
        plot_lengths(lengths, cfg["max_seq_len"], tmp / "lengths.png")
        write_json(tmp / "stats.json", stats)
    log(f"wrote {out_dir}; {round(time.perf_counter() - start, 1)} s in all")
    dropped = _dropped_line(stats, Path(out_dir) / "stats.json")
    if dropped:
        (console or log)(dropped)
    return stats
