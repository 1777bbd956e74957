"""Data preparation: rendering equals the tokenizer's own chat templating, masks equal its
assistant masks, packing keeps every token and isolates sequences, bad input stops with a
message naming file, row and reason (or is counted), outputs are complete or absent, and the
cache key follows the data settings."""

import copy
import json
import re
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from shardtune.config import prepared_key
from shardtune.data.prepare import SplitReport, prepare, prepare_split
from shardtune.data.templates import CHATML, chat_template
from shardtune.data.tokenize import IGNORE_INDEX, load_tokenizer, render_batch, tokenize_rendered
from shardtune.errors import DataError
from shardtune.inputs.builtin_data import build_conversations
from shardtune.inputs.sources import ROW_COLUMN, fetch_dataset, model_path
from shardtune.io import read_json, write_json

from data_fixtures import (  # noqa: F401  (fixtures)
    DEFAULTS,
    TRICKY,
    builtin_dataset,
    builtin_model,
    chat,
    chatml_tokenizer,
    data_cfg,
    dataset_spec,
    write_jsonl,
)

QUIET = dict(log=lambda *a: None)

# A Llama-3-like template from a file: BOS from the template, headers, {% generation %}.
FILE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
)


def as_messages(row):
    return row["messages"]


def to_sharegpt(row):
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in row["messages"]]}


@pytest.fixture(scope="session")
def llama_like_model(tmp_path_factory):
    """A sentencepiece-style (Metaspace) BPE tokenizer with a BOS post-processor, like Llama-2's,
    as a fetched model directory (tokenizer only)."""
    corpus = [m["content"] for row in build_conversations(500, 1) for m in row["messages"]]
    corpus += [m["content"] for row in TRICKY for m in row["messages"]]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=[f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out = tmp_path_factory.mktemp("llama_like")
    fast.save_pretrained(out / "files")
    write_json(out / "source.json", {"source": "test", "path": str(out / "files")})
    return out


def split_of(rows, cfg, tokenizer, origin="chats.jsonl", num_proc=1):
    ds = datasets.Dataset.from_list(rows, on_mixed_types="use_json")
    return prepare_split(ds, "train", cfg, tokenizer, report=SplitReport("train", origin, {}), num_proc=num_proc, **QUIET)


# --- rendering and masks -------------------------------------------------------------------


@pytest.mark.parametrize("template", ["chatml", "zephyr", "tokenizer", "file"])
@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "prompt_completion", "conversational_prompt_completion"])
def test_rendered_text_equals_apply_chat_template(builtin_model, tmp_path, template, fmt):
    if template == "file":
        (tmp_path / "t.jinja").write_text(FILE_TEMPLATE)
        template = str(tmp_path / "t.jinja")
    tokenizer, _ = load_tokenizer(builtin_model, template)
    rows = TRICKY if fmt != "prompt_completion" else [chat("a question", "an answer"), chat("😀", "")]
    convert = {
        "messages": as_messages,
        "sharegpt": to_sharegpt,
        "prompt_completion": lambda r: {"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"]},
        "conversational_prompt_completion": lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]},
    }[fmt]
    converted = [convert(r) for r in rows]
    fields = {"sharegpt": {"conversations": "conversations"}, "messages": {"messages": "messages"}}.get(
        fmt, {"prompt": "prompt", "completion": "completion"}
    )
    batch = {ROW_COLUMN: list(range(len(rows)))}
    if fmt == "messages":
        batch["messages"] = converted
    else:
        batch.update({k: [c[k] for c in converted] for k in converted[0]})
    out = render_batch(
        batch,
        fmt="prompt_completion" if "prompt" in fmt else fmt,
        fields=fields,
        template=tokenizer.chat_template,
        template_kwargs=dict(tokenizer.special_tokens_map),
    )
    assert out["reason"] == [""] * len(rows)
    assert out["text"] == [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]


def test_text_format_is_taken_as_is(chatml_tokenizer):
    texts = ["plain text one", "two 😀"]
    packed, stats, _ = split_of([{"text": t} for t in texts], data_cfg(packing=False), chatml_tokenizer)
    assert stats["format"] == "text"
    assert [chatml_tokenizer.decode(r) for r in packed["input_ids"]] == texts
    assert list(packed["labels"]) == list(packed["input_ids"])  # text has no assistant turns: full-text loss


@pytest.mark.parametrize("model", ["builtin_model", "llama_like_model"])
@pytest.mark.parametrize("template", ["chatml", "zephyr", "file"])
def test_masks_cover_exactly_the_assistant_tokens(request, tmp_path, model, template):
    if template == "file":
        (tmp_path / "t.jinja").write_text(FILE_TEMPLATE)
        template = str(tmp_path / "t.jinja")
    tokenizer, _ = load_tokenizer(request.getfixturevalue(model), template)
    rows = TRICKY + build_conversations(40, 5)
    packed, stats, _ = split_of(rows, data_cfg(chat_template_format=template, packing=False, max_seq_len=4096), tokenizer)
    assert stats["conversations_out"] == len(rows)
    for row, ids, labels in zip(rows, packed["input_ids"], packed["labels"]):
        ref = tokenizer.apply_chat_template(row["messages"], return_dict=True, return_assistant_tokens_mask=True)
        assert ids == ref["input_ids"]
        expected = np.where(np.array(ref["assistant_masks"], bool), ref["input_ids"], IGNORE_INDEX)
        assert labels == expected.tolist()
        assert any(x != IGNORE_INDEX for x in labels)


def test_tokenize_rendered_matches_per_chunk_boundaries(chatml_tokenizer, monkeypatch):
    # Chunks of the batched tokenizer must not shift masks: compare small and large chunks.
    from shardtune.data import tokenize as data

    texts, spans = [], []
    for row in TRICKY * 3:
        from transformers.utils.chat_template_utils import render_jinja_template

        text, idx = render_jinja_template([row["messages"]], chat_template=CHATML, return_assistant_tokens_mask=True,
                                          **chatml_tokenizer.special_tokens_map)
        texts += text
        spans.append([p for span in idx[0] for p in span])
    whole = tokenize_rendered(texts, spans, chatml_tokenizer)
    monkeypatch.setattr(data, "TOKENIZE_CHUNK", 4)
    chunked = tokenize_rendered(texts, spans, chatml_tokenizer)
    for a, b in zip(whole, chunked):
        assert np.array_equal(a, b)


def test_full_text_loss_when_assistant_only_is_off(chatml_tokenizer):
    packed, stats, _ = split_of(build_conversations(30, 2), data_cfg(assistant_only_loss=False), chatml_tokenizer)
    assert list(packed["labels"]) == list(packed["input_ids"])
    assert stats["loss_tokens"] == stats["tokens"]


def test_template_without_generation_block_needs_full_text_loss(builtin_model, tmp_path):
    plain = tmp_path / "plain.jinja"
    plain.write_text(CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    tokenizer, _ = load_tokenizer(builtin_model, str(plain))
    cfg = data_cfg(chat_template_format=str(plain))
    with pytest.raises(DataError, match=r"does not mark assistant output with \{% generation %\}"):
        split_of([chat()] * 3, cfg, tokenizer)
    packed, _, _ = split_of([chat()] * 3, {**cfg, "assistant_only_loss": False}, tokenizer)
    assert len(packed) == 1


def test_unknown_template_names_are_refused(builtin_model):
    with pytest.raises(DataError, match="'llama9' is neither chatml, zephyr, tokenizer nor an existing file"):
        load_tokenizer(builtin_model, "llama9")


# --- tokenizer: special tokens of the format, add_special_tokens, append_concat_token ------


def test_format_tokens_are_added_and_recorded(llama_like_model, builtin_model):
    tokenizer, added = load_tokenizer(llama_like_model, "chatml")
    assert added == ["<|im_start|>", "<|im_end|>"] and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.tokenize("<|im_start|>user") [0] == "<|im_start|>"  # one token, never split
    tokenizer, added = load_tokenizer(llama_like_model, "zephyr")
    assert added == ["<|system|>", "<|user|>", "<|assistant|>"] and tokenizer.eos_token == "</s>"
    assert load_tokenizer(builtin_model, "chatml")[1] == []  # the built-in tokenizer has them


def test_add_special_tokens_lets_the_tokenizer_add_bos(llama_like_model):
    tokenizer, _ = load_tokenizer(llama_like_model, "chatml")
    rows = build_conversations(20, 0)
    off, _, _ = split_of(rows, data_cfg(packing=False), tokenizer)
    on, _, _ = split_of(rows, data_cfg(packing=False, add_special_tokens=True), tokenizer)
    bos = tokenizer.bos_token_id
    for a, a_labels, b, b_labels in zip(off["input_ids"], off["labels"], on["input_ids"], on["labels"]):
        assert a[0] != bos and b == [bos] + a
        assert b_labels == [IGNORE_INDEX] + a_labels  # the added BOS carries no loss


@pytest.mark.parametrize("assistant_only", [True, False])
def test_append_concat_token_ends_every_packed_sequence_with_eos(chatml_tokenizer, assistant_only):
    rows = build_conversations(60, 4)
    cfg = data_cfg(assistant_only_loss=assistant_only, max_seq_len=256)
    plain, plain_stats, _ = split_of(rows, cfg, chatml_tokenizer)
    eos, eos_stats, _ = split_of(rows, {**cfg, "append_concat_token": True}, chatml_tokenizer)
    assert eos_stats["tokens"] == plain_stats["tokens"] + len(rows)
    eos_id = chatml_tokenizer.eos_token_id
    for ids, labels, lengths in zip(eos["input_ids"], eos["labels"], eos["seq_lengths"]):
        ends = np.cumsum(lengths) - 1
        assert all(ids[e] == eos_id for e in ends)
        assert all(labels[e] == (IGNORE_INDEX if assistant_only else eos_id) for e in ends)
    unpacked, _, _ = split_of(rows, {**cfg, "append_concat_token": True, "packing": False}, chatml_tokenizer)
    assert sum(map(len, unpacked["input_ids"])) == plain_stats["tokens"]  # only when packing, as in the recipe


# --- packing ---------------------------------------------------------------------------------


def sequences(ds):
    """(input_ids, labels) of every sequence in packed or unpacked rows, split at seq_lengths."""
    out = []
    for ids, labels, lengths in zip(ds["input_ids"], ds["labels"], ds["seq_lengths"]):
        assert sum(lengths) == len(ids) == len(labels)
        start = 0
        for n in lengths:
            out.append((tuple(ids[start : start + n]), tuple(labels[start : start + n])))
            start += n
    return out


def test_packing_keeps_every_token_and_boundary(chatml_tokenizer):
    rows = build_conversations(3000, 0)
    cfg = data_cfg(max_seq_len=512)
    packed, stats, _ = split_of(rows, cfg, chatml_tokenizer, num_proc=2)
    unpacked, _, _ = split_of(rows, {**cfg, "packing": False}, chatml_tokenizer)
    assert all(len(lengths) == 1 for lengths in unpacked["seq_lengths"])
    assert sorted(sequences(packed)) == sorted(sequences(unpacked))
    assert max(map(len, packed["input_ids"])) <= 512
    assert stats["tokens"] == sum(map(len, packed["input_ids"]))
    assert stats["packing_efficiency"] >= 0.98
    assert stats["rows"] == len(packed) < len(rows) / 5


@pytest.fixture(scope="module")
def packed_builtin(builtin_dataset, builtin_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "builtin"
    stats = prepare(builtin_dataset, builtin_model, {"data": data_cfg()}, out, num_proc=2, **QUIET)
    return out, stats


def test_builtin_set_packs_at_98_percent(packed_builtin):
    out, stats = packed_builtin
    for split in ("train", "test"):
        s = stats["splits"][split]
        assert s["packing_efficiency"] >= 0.98, (split, s["packing_efficiency"])
        assert s["conversations_out"] == s["conversations_in"] and not s["dropped"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_sequences_do_not_attend_across_boundaries(packed_builtin, builtin_model, attn):
    """Logits of each sequence in a packed row (input ids + restarting position ids, no
    attention mask, no cache) equal those of the sequence alone; with positions that do not
    restart the same row leaks, which shows the test can fail."""
    out, _ = packed_builtin
    row = next(r for r in datasets.load_from_disk(str(out / "data"))["train"] if len(r["seq_lengths"]) >= 3)
    model = LlamaForCausalLM.from_pretrained(model_path(builtin_model), attn_implementation=attn).eval()
    ids = torch.tensor(row["input_ids"])[None]
    positions = torch.cat([torch.arange(n) for n in row["seq_lengths"]])[None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
        leaky = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], use_cache=False).logits[0]
        start = 0
        for i, n in enumerate(row["seq_lengths"]):
            alone = model(input_ids=ids[:, start : start + n], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + n], alone, atol=1e-5, rtol=0)
            if i > 0:
                assert (leaky[start : start + n] - alone).abs().max() > 1e-3
            start += n


def test_trl_collator_gives_restarting_positions(packed_builtin):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    out, _ = packed_builtin
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    rows = datasets.load_from_disk(str(out / "data"))["train"].select(range(2))
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(list(rows))
    assert "attention_mask" not in batch
    expected = torch.cat([torch.arange(n) for r in rows for n in r["seq_lengths"]])
    assert torch.equal(batch["position_ids"][0], expected)


# --- outputs, stats, caching -----------------------------------------------------------------


def test_prepare_writes_the_contract(packed_builtin):
    out, stats = packed_builtin
    assert sorted(p.name for p in out.iterdir()) == ["data", "lengths.png", "stats.json", "tokenizer"]
    assert not list(out.parent.glob(".*tmp*"))
    data = datasets.load_from_disk(str(out / "data"))
    assert set(data) == {"train", "test"}
    assert set(data["train"].column_names) == {"input_ids", "labels", "seq_lengths"}
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert tokenizer.chat_template == CHATML
    assert (out / "lengths.png").read_bytes()[:4] == b"\x89PNG"
    assert read_json(out / "stats.json") == json.loads(json.dumps(stats))
    train = stats["splits"]["train"]
    for key in ("conversations_in", "conversations_out", "tokens", "loss_tokens", "truncated", "dropped",
                "packing_efficiency", "length_histogram", "rows"):
        assert key in train
    assert sum(train["length_histogram"]["counts"]) == train["conversations_out"]
    assert 0 < train["loss_tokens"] < train["tokens"]
    assert stats["added_tokens"] == [] and "num_proc" not in stats["settings"]


def test_zephyr_adds_tokens_to_the_saved_tokenizer(builtin_dataset, builtin_model, tmp_path):
    stats = prepare(builtin_dataset, builtin_model, {"data": data_cfg(chat_template_format="zephyr")}, tmp_path / "z", **QUIET)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "z" / "tokenizer")
    assert stats["added_tokens"] == ["<|system|>", "<|user|>", "<|assistant|>"]
    assert len(tokenizer) == stats["tokenizer"]["size"] == 512 + 3
    ids = datasets.load_from_disk(str(tmp_path / "z" / "data"))["train"][0]["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in ids


def test_prepared_key_follows_data_settings_only():
    base = copy.deepcopy(DEFAULTS)
    key = prepared_key(base)
    changes = {
        "format": "messages",
        "columns": {"messages": "chat"},
        "chat_template_format": "zephyr",
        "add_special_tokens": True,
        "append_concat_token": True,
        "max_seq_len": 1024,
        "packing": False,
        "assistant_only_loss": False,
        "too_long": "drop",
        "on_bad_row": "skip",
    }
    assert set(changes) == set(base["data"]), "a new data setting needs a case here"
    for name, value in changes.items():
        changed = copy.deepcopy(base)
        changed["data"][name] = value
        assert prepared_key(changed) != key, name
    for section, name, value in [("dataset", "source", "x.jsonl"), ("dataset", "test_size", 0.2), ("model", "source", "hf:o/m")]:
        changed = copy.deepcopy(base)
        changed[section][name] = value
        assert prepared_key(changed) != key, name
    for section, name, value in [("training", "learning_rate", 0.5), ("training", "seed", 1), ("lora", "r", 64),
                                 ("fsdp", "offload_params", True), ("training", "num_train_epochs", 3)]:
        changed = copy.deepcopy(base)
        changed[section][name] = value
        assert prepared_key(changed) == key, name


# --- bad input -------------------------------------------------------------------------------

GOOD = [chat(f"question {i}", f"answer {i}") for i in range(8)]
BAD_ROWS = {
    "missing messages": ({"other": 1}, r"row 5 \(line 6\): missing or empty messages: no messages"),
    "empty messages": ({"messages": []}, r"row 5 \(line 6\): missing or empty messages: messages is empty"),
    "unknown role": (
        {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        r"row 5 \(line 6\): unknown role: messages\[0\] has role 'bot'",
    ),
    "non-string content": (
        {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]},
        r"row 5 \(line 6\): non-string content: messages\[0\] \(user\) has int content",
    ),
    "content parts": (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "x"}]},
        r"non-string content: messages\[0\] \(user\) has list content",
    ),
    "no role": ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, r"messages\[0\] has no role"),
    "no assistant turn": ({"messages": [{"role": "user", "content": "hi"}]}, r"row 5 \(line 6\): no assistant turn"),
    # Text among lists is a string as written, not JSON to parse (only a column of text is).
    "messages as text": ({"messages": json.dumps(chat()["messages"])}, r"row 5 \(line 6\): missing or empty messages: messages is a str"),
}


def prepare_file(tmp_path, model, lines, console=None, **data):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    fetch_dataset(dataset_spec(path, test_size=0.25), tmp_path / "ds")
    return prepare(tmp_path / "ds", model, {"data": data_cfg(**data)}, tmp_path / "out", num_proc=1, console=console, **QUIET)


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_stops_with_file_row_and_reason(tmp_path, builtin_model, case):
    row, message = BAD_ROWS[case]
    lines = [json.dumps(r) for r in GOOD]
    lines.insert(5, json.dumps(row))
    with pytest.raises(DataError) as err:
        prepare_file(tmp_path, builtin_model, lines)
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 'chats.jsonl'}, row 5")
    assert text.endswith("set data.on_bad_row: skip to drop such rows") and "\n" not in text
    assert re.search(message, text), text
    assert not (tmp_path / "out").exists()


def test_invalid_json_line_stops_with_its_line(tmp_path, builtin_model):
    lines = [json.dumps(r) for r in GOOD]
    lines.insert(2, '{"messages": [')
    with pytest.raises(DataError, match=r"chats.jsonl: line 3: invalid JSON \(Expecting value, column 15\); set data.on_bad_row"):
        prepare_file(tmp_path, builtin_model, lines)


def test_skip_drops_and_counts_every_bad_row_by_reason(tmp_path, builtin_model):
    lines = [json.dumps(r) for r in GOOD] + [json.dumps(row) for row, _ in BAD_ROWS.values()] + ["{broken"]
    said = []
    stats = prepare_file(tmp_path, builtin_model, lines, on_bad_row="skip", console=said.append)
    dropped = Counter()
    for split in stats["splits"].values():
        dropped.update(split["dropped"])
    assert dict(dropped) == {
        "missing or empty messages": 3,
        "unknown role": 1,
        "non-string content": 2,
        "malformed message": 1,
        "no assistant turn": 1,
    }
    assert stats["dropped_at_load"] == {"invalid JSON": 1}
    assert sum(s["conversations_out"] for s in stats["splits"].values()) == len(GOOD)
    # The same counts, in one line for the console.
    assert said == [
        "dropped 9 rows: train 5 (2 missing or empty messages, 1 malformed message, 1 no assistant turn, 1 non-string content); "
        f"test 3 (1 missing or empty messages, 1 non-string content, 1 unknown role); at load 1 (1 invalid JSON); see {tmp_path / 'out' / 'stats.json'}"
    ]
    assert (stats["splits"]["train"]["dropped"], stats["splits"]["test"]["dropped"]) == (
        {"missing or empty messages": 2, "malformed message": 1, "no assistant turn": 1, "non-string content": 1},
        {"missing or empty messages": 1, "non-string content": 1, "unknown role": 1},
    )


JSON_LIKE = ["243", "[1, 2]", '{"a": 1}', "null", "true"]


def test_json_like_text_next_to_a_mixed_type_row_stays_text(tmp_path, builtin_model):
    # One int content makes the field mixed-type; contents that read as JSON stay the strings they are.
    rows = [chat(f"question {i}", JSON_LIKE[i % 5] if i % 2 else f"answer {i}") for i in range(300)]
    rows[150]["messages"][1]["content"] = 7
    lines = [json.dumps(r) for r in rows]
    with pytest.raises(DataError) as err:
        prepare_file(tmp_path, builtin_model, lines)
    assert str(err.value) == (
        f"{tmp_path / 'chats.jsonl'}, row 150 (line 151): non-string content: messages[1] (assistant) has int content; "
        "set data.on_bad_row: skip to drop such rows"
    )
    stats = prepare_file(tmp_path, builtin_model, lines, on_bad_row="skip")
    assert [s["dropped"] for s in stats["splits"].values()].count({"non-string content": 1}) == 1
    assert sum(s["conversations_out"] for s in stats["splits"].values()) == 299
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
    data = datasets.load_from_disk(str(tmp_path / "out" / "data"))
    text = "".join(tokenizer.decode(ids) for split in data.values() for ids in split["input_ids"])
    for value in JSON_LIKE:
        assert text.count(f"<|im_start|>assistant\n{value}<|im_end|>") == 30, value


def test_sharegpt_rows_are_checked(chatml_tokenizer):
    rows = [to_sharegpt(chat()), {"conversations": [{"from": "bot", "value": "x"}, {"from": "gpt", "value": "y"}]}]
    with pytest.raises(DataError, match=r"chats.jsonl, row 1: unknown role: conversations\[0\] has from 'bot'"):
        split_of(rows, data_cfg(), chatml_tokenizer)
    rows[1] = {"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "y"}]}
    with pytest.raises(DataError, match=r"row 1: malformed message: conversations\[0\] has no content"):
        split_of(rows, data_cfg(), chatml_tokenizer)


@pytest.mark.parametrize("mode", ["error", "drop", "truncate"])
def test_too_long_conversations(chatml_tokenizer, mode):
    long = chat("word " * 200, "answer " * 100)
    rows = [chat(), long, chat("hi", "there")]
    cfg = data_cfg(max_seq_len=64, too_long=mode, packing=False)
    if mode == "error":
        with pytest.raises(DataError, match=r"chats.jsonl, row 1: \d+ tokens exceed data.max_seq_len=64"):
            split_of(rows, cfg, chatml_tokenizer)
        return
    out, stats, _ = split_of(rows, cfg, chatml_tokenizer)
    if mode == "drop":
        assert stats["dropped"] == {"longer than max_seq_len": 1} and len(out) == 2
    else:
        # The user turn alone fills 64 tokens, so no assistant token survives: dropped, counted.
        assert stats["dropped"] == {"no assistant token left after truncation": 1} and stats["truncated"] == 0
        rows[1] = chat("short", "answer " * 100)
        out, stats, _ = split_of(rows, cfg, chatml_tokenizer)
        assert stats["truncated"] == 1 and max(map(len, out["input_ids"])) == 64


def test_column_mapping_and_format_errors(chatml_tokenizer):
    rows = [{"chat": chat()["messages"]}] * 3
    out, stats, _ = split_of(rows, data_cfg(columns={"messages": "chat"}), chatml_tokenizer)
    assert stats["columns"] == {"messages": "chat"} and stats["conversations_out"] == 3
    with pytest.raises(DataError, match=r"data.columns.messages: no column 'dialog' in chats.jsonl \(has: chat\)"):
        split_of(rows, data_cfg(columns={"messages": "dialog"}), chatml_tokenizer)
    with pytest.raises(DataError, match=r"cannot tell the format of chats.jsonl: .*\(has: chat\)"):
        split_of(rows, data_cfg(), chatml_tokenizer)
    with pytest.raises(DataError, match=r"data.format: sharegpt needs a 'conversations' column"):
        split_of(rows, data_cfg(format="sharegpt"), chatml_tokenizer)


def test_empty_split_and_nothing_left(chatml_tokenizer):
    with pytest.raises(DataError, match="split 'train' is empty"):
        prepare_split(datasets.Dataset.from_dict({"messages": []}), "train", data_cfg(), chatml_tokenizer,
                      report=SplitReport("train", None, {}), **QUIET)
    with pytest.raises(DataError, match=r"no usable conversation left in split 'train' \(dropped: \{'no assistant turn': 2\}\)"):
        split_of([{"messages": [{"role": "user", "content": "x"}]}] * 2, data_cfg(on_bad_row="skip"), chatml_tokenizer)


def test_template_errors_are_bad_rows(builtin_model, tmp_path):
    strict = tmp_path / "strict.jinja"
    strict.write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}"
        "{{ m['role'] + ': ' }}{% generation %}{{ m['content'] }}{% endgeneration %}\n{% endfor %}"
    )
    tokenizer, _ = load_tokenizer(builtin_model, str(strict))
    rows = [chat(), chat(system="sys"), chat()]
    with pytest.raises(DataError, match="row 1: chat template error: no system messages"):
        split_of(rows, data_cfg(chat_template_format=str(strict)), tokenizer)
    _, stats, _ = split_of(rows, data_cfg(chat_template_format=str(strict), on_bad_row="skip"), tokenizer)
    assert stats["dropped"] == {"chat template error": 1}



def test_a_template_that_does_not_compile_stops_before_any_row(builtin_model, tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{% generation %}\n{{ m['content'] }\n{% endgeneration %}{% endfor %}")
    with pytest.raises(DataError) as err:
        prepare_file(tmp_path, builtin_model, [json.dumps(r) for r in GOOD], chat_template_format=str(broken), on_bad_row="skip")
    assert str(err.value) == f"data.chat_template_format: {broken}: line 2: Jinja syntax error: unexpected '}}'"
    broken.write_text("{% for m in messages %}\n\n{{ m['content'] | shout }}{% endfor %}")
    with pytest.raises(DataError, match=rf"^data.chat_template_format: {re.escape(str(broken))}: line 3: Jinja syntax error: No filter named 'shout'.$"):
        load_tokenizer(builtin_model, str(broken))
    model_template = type("Tokenizer", (), {"chat_template": "{% if %}"})()
    with pytest.raises(DataError, match=r"^data.chat_template_format: tokenizer \(the model's own template\): line 1: Jinja syntax error"):
        chat_template("tokenizer", model_template)


@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
def test_a_template_that_fails_on_every_row_is_one_template_error(builtin_model, tmp_path, on_bad_row):
    failing = tmp_path / "failing.jinja"
    failing.write_text("{% for m in messages %}\n{% generation %}{{ m['content'].upper(1) }}{% endgeneration %}{% endfor %}")
    with pytest.raises(DataError) as err:
        prepare_file(tmp_path, builtin_model, [json.dumps(r) for r in GOOD], chat_template_format=str(failing), on_bad_row=on_bad_row)
    assert str(err.value) == (
        f"data.chat_template_format: {failing}: the template fails on each of the first 6 conversations: "
        "str.upper() takes no arguments (1 given) (template line 2)"
    )
    assert not (tmp_path / "out").exists()


def test_trl_bfd_packing_is_reproduced_exactly():
    # The packed table is built with numpy; it must be the one TRL's pack_dataset makes,
    # ties (many equal lengths) and exact fits included.
    import pyarrow as pa
    from trl.data_utils import pack_dataset

    from shardtune.data.pack import packed_table

    rng = np.random.default_rng(0)
    for trial in range(12):
        max_len = int(rng.integers(4, 300))
        high = 8 if trial % 3 == 0 else max_len + 1
        lengths = np.minimum(rng.integers(1, high, int(rng.integers(1, 1500))), max_len)
        ids = rng.integers(0, 500, int(lengths.sum())).astype(np.int32)
        labels = np.where(rng.random(len(ids)) < 0.5, ids, IGNORE_INDEX).astype(np.int32)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), type=pa.int32())
        unpacked = datasets.Dataset(pa.table({
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids)),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(labels)),
        }))
        ref = pack_dataset(unpacked, max_len, strategy="bfd", map_kwargs={"batch_size": len(unpacked), "keep_in_memory": True})
        ours = datasets.Dataset(packed_table(ids, labels, lengths, max_len))
        assert ours.features == ref.features
        assert ours.data.table.equals(ref.data.table), trial


# --- worker processes ----------------------------------------------------------------------


@pytest.fixture
def small_shares(monkeypatch):
    """Worker processes even for a few dozen rows, several shares each."""
    from shardtune.data import workers as data

    monkeypatch.setattr(data, "WORKER_MIN_ROWS", 10)
    monkeypatch.setattr(data, "TASKS_PER_WORKER", 3)


def with_bad_rows(rows, at):
    rows = list(rows)
    for position in at:
        rows.insert(position, {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]})
    return rows


@pytest.mark.parametrize("assistant_only", [True, False])
@pytest.mark.parametrize("packing", [True, False])
def test_workers_give_the_same_output_as_one_process(chatml_tokenizer, small_shares, assistant_only, packing):
    rows = with_bad_rows(TRICKY + build_conversations(70, 3), at=[3, 41, 74])
    cfg = data_cfg(assistant_only_loss=assistant_only, packing=packing, max_seq_len=256, on_bad_row="skip")
    one, one_stats, one_lengths = split_of(rows, cfg, chatml_tokenizer, num_proc=1)
    two, two_stats, two_lengths = split_of(rows, cfg, chatml_tokenizer, num_proc=2)
    assert (one_stats["workers"], two_stats["workers"]) == (1, 2)
    assert two.features == one.features and two.data.table.equals(one.data.table)
    assert np.array_equal(two_lengths, one_lengths)
    for stats in (one_stats, two_stats):
        for key in ("seconds", "worker_seconds", "workers"):
            del stats[key]
    assert two_stats == one_stats and one_stats["dropped"] == {"unknown role": 3}


def test_a_bad_row_in_a_later_share_names_its_row(chatml_tokenizer, small_shares):
    rows = with_bad_rows(build_conversations(60, 4), at=[47, 55])  # shares of 10 rows: the 5th and 6th
    with pytest.raises(DataError, match=r"^chats.jsonl, row 47: unknown role: messages\[0\] has role 'bot' .*\(1 more bad row in this split\)"):
        split_of(rows, data_cfg(), chatml_tokenizer, num_proc=2)
    # Rows keep their source numbers (here: after a shuffle) wherever a worker sees them.
    ds = datasets.Dataset.from_list(rows).add_column(ROW_COLUMN, list(range(len(rows)))).shuffle(seed=1)
    first = min(47, 55, key=ds[ROW_COLUMN].index)
    with pytest.raises(DataError, match=rf"^chats.jsonl, row {first}: unknown role"):
        prepare_split(ds, "train", data_cfg(), chatml_tokenizer, report=SplitReport("train", "chats.jsonl", {}), num_proc=2, **QUIET)


def test_a_too_long_row_in_a_later_share_names_its_row(chatml_tokenizer, small_shares):
    rows = [chat(f"What is {i} + 1?", str(i + 1)) for i in range(60)]
    rows[38] = chat("word " * 200, "answer " * 100)
    with pytest.raises(DataError, match=r"chats.jsonl, row 38: \d+ tokens exceed data.max_seq_len=128 \(0 more such rows\)"):
        split_of(rows, data_cfg(max_seq_len=128, too_long="error"), chatml_tokenizer, num_proc=2)
