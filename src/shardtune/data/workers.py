"""Render and tokenize in forked worker processes over contiguous shares of the rows, results
back in row order."""

import multiprocessing
import os
import time

import numpy as np

from shardtune.data.tokenize import RENDER_BATCH, render_batch, tokenize_rendered
from shardtune.inputs.sources import ROW_COLUMN

WORKER_MIN_ROWS = 1000  # a worker process for fewer rows than this is not worth its start

TASKS_PER_WORKER = 8  # shares per worker: less time with one worker idle at the end

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
        out = render_batch(batch, **render)
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


def run_workers(ds, workers, kwargs, progress):
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
