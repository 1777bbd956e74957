"""Fixtures and helpers for the data-stage tests (tests/test_data.py, tests/test_sources.py):
the built-in model fetched once per session, default settings from the schema, and writers
for small source files."""

import copy
import json
from pathlib import Path

import pytest

from shardtune.config import resolve_runs

DEFAULTS = resolve_runs({"runs": {"t": {}}})["t"]


def dataset_spec(source, **overrides):
    return {**copy.deepcopy(DEFAULTS["dataset"]), "source": str(source), **overrides}


def data_cfg(**overrides):
    return {**copy.deepcopy(DEFAULTS["data"]), **overrides}


def write_jsonl(path, rows):
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat(user="What is 2 + 3?", assistant="5", system=None):
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


# Conversations that exercise the masks: several turns, unicode and emoji (several byte-level
# tokens per character), leading/trailing spaces, an empty assistant answer, newlines.
TRICKY = [
    chat(),
    chat("Hi", " leading space and trailing ", system="Be brief."),
    chat("naïve café — ünïcödé?", "Ja: straße, 東京, 😀🚀 done"),
    chat("empty answer follows", ""),
    {"messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "first\nquestion"},
        {"role": "assistant", "content": "first\n\nanswer"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "😀"},
        {"role": "user", "content": "third"},
        {"role": "assistant", "content": "  ends with spaces  "},
    ]},
]


@pytest.fixture(scope="session")
def builtin_model(tmp_path_factory):
    """The built-in tiny Llama model and tokenizer, fetched as the workflow fetches it."""
    from shardtune.inputs.sources import fetch_model

    out = tmp_path_factory.mktemp("model") / "builtin"
    fetch_model(copy.deepcopy(DEFAULTS["model"]), out)
    return out


@pytest.fixture(scope="session")
def builtin_dataset(tmp_path_factory):
    """The built-in data set, fetched as the workflow fetches it."""
    from shardtune.inputs.sources import fetch_dataset

    out = tmp_path_factory.mktemp("dataset") / "builtin"
    fetch_dataset(dataset_spec("builtin"), out)
    return out


@pytest.fixture(scope="session")
def chatml_tokenizer(builtin_model):
    from shardtune.data.tokenize import load_tokenizer

    return load_tokenizer(builtin_model, "chatml")[0]
