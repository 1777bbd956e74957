"""Data preparation: validate each conversation, render it with the chat template, tokenize
in large batches with the fast tokenizer, mask non-assistant tokens, and pack with best-fit
decreasing (TRL's `pack_dataset`), keeping sequence boundaries as `seq_lengths`."""

import time
from pathlib import Path

import datasets
import numpy as np
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template
from trl.data_utils import pack_dataset

from .errors import UserError
from .io import atomic_dir, write_json
from .sources import SourceError, model_path
from .templates import FORMAT_TOKENS, chat_template

ROLES = {"system", "user", "assistant"}
IGNORE_INDEX = -100


class DataError(UserError):
    """A bad row or a data setting that cannot work; the message names the row."""


def check_conversation(messages):
    """Return None for a usable conversation, else the reason it is not."""
    if not isinstance(messages, list) or not messages:
        return "missing or empty messages"
    for turn in messages:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            return "a message without role/content"
        if turn["role"] not in ROLES:
            return f"unknown role {turn['role']!r}"
        if not isinstance(turn["content"], str):
            return f"non-string content in a {turn['role']} message"
    if not any(turn["role"] == "assistant" for turn in messages):
        return "no assistant turn"
    return None


def _tokenize_batch(batch, indices, *, tokenizer, template, max_seq_len, too_long, assistant_only, split, on_bad_row):
    convs, reasons = [], []
    for messages, index in zip(batch["messages"], indices):
        reason = check_conversation(messages)
        if reason and on_bad_row == "error":
            raise DataError(f"split '{split}', row {index}: {reason}")
        reasons.append(reason or "")
        convs.append([{"role": m["role"], "content": m["content"]} for m in messages] if not reason else [])

    good = [i for i, r in enumerate(reasons) if not r]
    rendered, spans = render_jinja_template(
        [convs[i] for i in good],
        chat_template=template,
        return_assistant_tokens_mask=True,
        **tokenizer.special_tokens_map,
    )
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    out = {"input_ids": [[] for _ in reasons], "labels": [[] for _ in reasons], "truncated": [False] * len(reasons)}
    for row, ids, offsets, gen in zip(good, encoded["input_ids"], encoded["offset_mapping"], spans):
        ids = np.asarray(ids, dtype=np.int64)
        if assistant_only:
            offsets = np.asarray(offsets).reshape(-1, 2)
            keep = np.zeros(len(ids), dtype=bool)
            for start, end in gen:  # a token carries loss when it overlaps an assistant span
                keep |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
            labels = np.where(keep, ids, IGNORE_INDEX)
        else:
            labels = ids
        if len(ids) > max_seq_len:
            if too_long == "error":
                raise DataError(
                    f"split '{split}', row {indices[row]}: {len(ids)} tokens exceed data.max_seq_len={max_seq_len}"
                )
            if too_long == "drop":
                reasons[row] = "longer than max_seq_len"
                continue
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            out["truncated"][row] = True
        out["input_ids"][row], out["labels"][row] = ids.tolist(), labels.tolist()
    out["dropped"] = reasons
    return out


def load_tokenizer(model_dir, fmt):
    """The model's tokenizer, with the special tokens the chat format needs added."""
    tokenizer = AutoTokenizer.from_pretrained(model_path(model_dir))
    missing = [t for t in FORMAT_TOKENS.get(fmt, []) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = chat_template(fmt, tokenizer)
    return tokenizer, missing


def prepare(dataset_dir, model_dir, settings, out_dir, log=print):
    """Tokenize and pack the fetched data set; write train/test, tokenizer and stats.json."""
    start = time.perf_counter()
    cfg = settings["data"]
    tokenizer, added = load_tokenizer(model_dir, cfg["chat_template_format"])
    template = tokenizer.chat_template
    raw = datasets.load_from_disk(str(Path(dataset_dir) / "data"))
    stats = {"added_tokens": added, "max_seq_len": cfg["max_seq_len"], "packing": cfg["packing"], "splits": {}}
    prepared = {}
    for split, ds in raw.items():
        if "messages" not in ds.column_names:
            raise SourceError(f"split '{split}': no 'messages' column (has: {', '.join(ds.column_names)})")
        log(f"[{split}] tokenizing {len(ds)} conversations with {cfg['num_proc']} workers")
        tokenized = ds.map(
            _tokenize_batch,
            with_indices=True,
            batched=True,
            batch_size=1000,
            num_proc=min(cfg["num_proc"], max(1, len(ds) // 1000)),
            remove_columns=ds.column_names,
            fn_kwargs=dict(
                tokenizer=tokenizer,
                template=template,
                max_seq_len=cfg["max_seq_len"],
                too_long=cfg["too_long"],
                assistant_only=cfg["assistant_only_loss"],
                split=split,
                on_bad_row=cfg["on_bad_row"],
            ),
            desc=f"tokenize {split}",
        )
        dropped = tokenized["dropped"]
        reasons = {}
        for reason in dropped:
            if reason:
                reasons[reason] = reasons.get(reason, 0) + 1
        kept = tokenized.filter(lambda r: not r, input_columns="dropped").remove_columns(["dropped"])
        if len(kept) == 0:
            raise DataError(f"split '{split}': no usable conversation left (dropped: {reasons})")
        lengths = np.fromiter((len(x) for x in kept["input_ids"]), dtype=np.int64, count=len(kept))
        labels_arr = kept.with_format("numpy")["labels"]
        loss_tokens = int(sum(int((np.asarray(x) != IGNORE_INDEX).sum()) for x in labels_arr))
        truncated = int(sum(kept["truncated"]))
        kept = kept.remove_columns(["truncated"])
        if cfg["packing"]:
            # One BFD pass over the whole split (not per 1000-row batch) for the best fill.
            final = pack_dataset(kept, cfg["max_seq_len"], strategy="bfd", map_kwargs={"batch_size": len(kept)})
            rows = len(final)
        else:
            final = kept.add_column("seq_lengths", [[int(n)] for n in lengths])
            rows = len(final)
        total = int(lengths.sum())
        counts, edges = np.histogram(lengths, bins=min(20, max(1, len(set(lengths.tolist())))))
        stats["splits"][split] = {
            "conversations_in": len(ds),
            "conversations_out": len(kept),
            "dropped": reasons,
            "truncated": truncated,
            "tokens": total,
            "loss_tokens": loss_tokens,
            "rows": rows,
            "packing_efficiency": total / (rows * cfg["max_seq_len"]) if cfg["packing"] else None,
            "length_histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
        }
        prepared[split] = final
        log(f"[{split}] {len(kept)} conversations, {total} tokens -> {rows} rows")
    stats["seconds"] = round(time.perf_counter() - start, 3)
    with atomic_dir(out_dir) as tmp:
        datasets.DatasetDict(prepared).save_to_disk(str(tmp / "data"))
        tokenizer.save_pretrained(tmp / "tokenizer")
        write_json(tmp / "stats.json", stats)
    return stats
