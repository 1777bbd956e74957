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

import os
import time
from collections import Counter
from pathlib import Path

import datasets
import numpy as np

from shardtune.data import workers as row_workers
from shardtune.data.formats import json_text_columns, resolve_format
from shardtune.data.pack import fingerprint, gather, packed_table, rows_table
from shardtune.data.templates import has_generation_block, template_name
from shardtune.data.tokenize import IGNORE_INDEX, TEMPLATE_ERROR, load_tokenizer, render_batch
from shardtune.errors import DataError
from shardtune.inputs.sources import ROW_COLUMN
from shardtune.io import atomic_dir, read_json, write_json

PROBE_ROWS = 16  # rendered first: when all fail alike, the template is at fault, not the rows


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
    reasons = render_batch(ds[:PROBE_ROWS], **render)["reason"]
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
    workers = max(1, min(num_proc, len(ds) // row_workers.WORKER_MIN_ROWS))
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
        for part in row_workers.run_workers(ds, workers, kwargs, progress):
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
        table = packed_table(ids, labels, lengths, max_len, starts=starts)
    else:
        if not contiguous:
            ids, labels = gather(ids, labels, starts, lengths, np.arange(len(lengths)))
        table = rows_table(ids, labels, lengths, np.ones(len(lengths), dtype=np.int64))  # one per row
    del ids, labels
    final = datasets.Dataset(table, fingerprint=fingerprint(table))
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
