"""Fetching inputs: the data set (built-in, local file or directory, hub) and the base model
(built-in, local directory, hub), each into resources/ under a content key."""

import json
from pathlib import Path

import datasets

from .builtin_data import build_conversations
from .errors import UserError
from .io import atomic_dir, read_json, write_json

HUB_PREFIX = "hf:"
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class SourceError(UserError):
    """An input that cannot be read; the message names the file, row or field."""


def _read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SourceError(f"{path}: line {number}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise SourceError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return datasets.Dataset.from_list(rows)


def _load_local(path):
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise SourceError(f"{path}: not a directory written by Dataset.save_to_disk ({err})") from None
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SourceError(f"dataset.source: {path}: unknown file type (use {', '.join(LOCAL_FORMATS)})")
    if path.suffix.lower() == ".jsonl":
        return datasets.DatasetDict(train=_read_jsonl(path))
    try:
        return datasets.load_dataset(fmt, data_files={"train": str(path)})
    except Exception as err:  # the loaders raise many types; name the file
        raise SourceError(f"{path}: cannot be read as {fmt}: {err}") from None


def load_raw_dataset(spec):
    """Return a DatasetDict with the splits named in spec['splits'] ('train' and 'test')."""
    source = spec["source"]
    if source == "builtin":
        rows = build_conversations(spec["builtin"]["conversations"], spec["builtin"]["seed"])
        raw = datasets.DatasetDict(train=datasets.Dataset.from_list(rows))
    elif source.startswith(HUB_PREFIX):
        raw = datasets.load_dataset(source[len(HUB_PREFIX) :], spec["subset"], revision=spec["revision"])
    else:
        path = Path(source)
        if not path.exists():
            raise SourceError(f"dataset.source: {path} does not exist")
        raw = _load_local(path)

    train_name, test_name = (spec["splits"] + ["test"])[:2]
    if train_name not in raw:
        raise SourceError(f"dataset.splits: no split '{train_name}' in {source} (has: {', '.join(raw)})")
    if len(raw[train_name]) == 0:
        raise SourceError(f"dataset: split '{train_name}' of {source} is empty")
    if test_name in raw:
        return datasets.DatasetDict(train=raw[train_name], test=raw[test_name])
    if len(raw) > 1:  # the data set has other splits, so a missing test split is a mistake
        raise SourceError(f"dataset.splits: no split '{test_name}' in {source} (has: {', '.join(raw)})")
    split = raw[train_name].train_test_split(test_size=spec["test_size"], seed=spec["split_seed"])
    return datasets.DatasetDict(train=split["train"], test=split["test"])


def fetch_dataset(spec, out_dir):
    raw = load_raw_dataset(spec)
    with atomic_dir(out_dir) as tmp:
        raw.save_to_disk(str(tmp / "data"))
        write_json(tmp / "source.json", {"spec": spec, "rows": {k: len(v) for k, v in raw.items()}})


def fetch_model(spec, out_dir):
    """Make the base model available and record where it is in out_dir/source.json."""
    source = spec["source"]
    with atomic_dir(out_dir) as tmp:
        record = {"source": source, "revision": spec["revision"]}
        if source == "builtin":
            from .builtin_model import build_model

            record["parameters"] = build_model(tmp / "files", spec["builtin"])
            record["path"] = str((Path(out_dir) / "files").resolve())
        elif source.startswith(HUB_PREFIX):
            from huggingface_hub import snapshot_download

            # Weights stay in the hub cache (shared across runs); we record the snapshot.
            path = snapshot_download(
                source[len(HUB_PREFIX) :],
                revision=spec["revision"],
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"],
            )
            record["path"] = str(Path(path).resolve())
            record["commit"] = Path(path).name
        else:
            path = Path(source)
            if not (path / "config.json").is_file():
                raise SourceError(f"model.source: {path} is not a model directory (no config.json)")
            record["path"] = str(path.resolve())
        write_json(tmp / "source.json", record)


def model_path(model_dir):
    """The directory holding the model files for a fetched model."""
    return read_json(Path(model_dir) / "source.json")["path"]
