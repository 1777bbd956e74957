"""Fetching inputs: the data set (built-in, local file or directory, hub) and the base model
(built-in, local directory, hub), each into resources/ under a content key.

A fetched data set is `data/` (a DatasetDict with `train` and `test`, saved with
`save_to_disk`) plus `source.json`: where each split came from and the JSON lines that could
not be parsed; every row keeps its source row number (column `ROW_COLUMN`). The prepare step
reads these to name the file and row of a bad conversation."""

import codecs
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from shardtune.errors import UserError
from shardtune.inputs.builtin_data import build_conversations
from shardtune.inputs.model_check import check_model_dir
from shardtune.io import atomic_dir, read_json, write_json

HUB_PREFIX = "hf:"
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ROW_COLUMN = "__source_row"


class SourceError(UserError):
    """An input that cannot be read; the message names the file, row or field."""


class Loaded:
    """A loaded source: its splits plus what the prepare step needs to report bad rows."""

    def __init__(self, splits, origin, bad_lines=(), available=None):
        self.splits = splits  # {split name: Dataset}
        self.origin = origin  # {split name: "file or hub id"}
        self.available = list(available or splits)  # every split the source has
        self.bad_lines = list(bad_lines)  # [{"file", "line", "reason"}]


def _json_rows(path):
    """Parse a JSON / JSON-lines file row by row (the slow path, used only when the Arrow
    reader refuses the file). Returns (rows, bad lines)."""
    text = Path(path).read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # anything else than several documents: the file is broken
                raise SourceError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from None
        else:
            if not isinstance(whole, list):
                raise SourceError(f"{path}: expected a list of objects or JSON lines, got {type(whole).__name__}")
            rows, bad = [], []
            for number, row in enumerate(whole):
                if isinstance(row, dict):
                    rows.append(row)
                else:
                    bad.append({"file": str(path), "line": None, "item": number, "reason": f"expected a JSON object, got {type(row).__name__}"})
            return rows, bad
    rows, bad = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            bad.append({"file": str(path), "line": number, "reason": f"invalid JSON ({err.msg}, column {err.colno})"})
            continue
        if not isinstance(row, dict):
            bad.append({"file": str(path), "line": number, "reason": f"expected a JSON object, got {type(row).__name__}"})
            continue
        rows.append(row)
    return rows, bad


def _from_rows(rows):
    """A Dataset from parsed rows; a field with values of several types becomes a Json field,
    so that every row can still be checked (and named) by the prepare step. Its values are
    encoded here: datasets' own encoding keeps a string that parses as JSON as it is, so the
    string "243" would come back as the number 243."""
    columns = {}
    for name in dict.fromkeys(key for row in rows for key in row):
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except pa.ArrowException:  # mixed types
            columns[name] = pa.array([None if v is None else json.dumps(v) for v in values], type=pa.json_())
    return datasets.Dataset(pa.table(columns))


def _load_json(path):
    try:  # fast path: the Arrow JSON reader; it refuses mixed types (see _from_rows)
        return datasets.load_dataset("json", data_files={"train": str(path)}, split="train", on_mixed_types=None), []
    except Exception:
        rows, bad = _json_rows(path)
    if not rows:
        detail = f" ({len(bad)} bad lines, the first: line {bad[0]['line']}: {bad[0]['reason']})" if bad else ""
        raise SourceError(f"{path}: no usable row{detail}")
    return _from_rows(rows), bad


def _check_utf8(path):
    """Stop at the first byte that is not UTF-8, naming its line and column: the Arrow JSON
    reader passes such bytes on, and only a later step would fail, naming neither."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as handle:
        try:
            while chunk := handle.read(1 << 24):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
            return
        except UnicodeDecodeError:
            handle.seek(0)
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                column = len(line[: err.start].decode("utf-8")) + 1
                raise SourceError(f"{path}: line {number}: not UTF-8 (byte 0x{line[err.start]:02x} at column {column})") from None


def _load_file(path):
    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SourceError(f"dataset.source: {path}: unknown file type (use {', '.join(LOCAL_FORMATS)}, or a directory)")
    if path.stat().st_size == 0:
        raise SourceError(f"dataset.source: {path} is empty")
    if fmt in ("json", "csv"):
        _check_utf8(path)
    if fmt == "json":
        return _load_json(path)
    try:
        return datasets.load_dataset(fmt, data_files={"train": str(path)}, split="train"), []
    except Exception as err:  # the loaders raise many types; name the file
        raise SourceError(f"{path}: cannot be read as {fmt}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def _is_saved_dataset(path):
    return any((path / name).is_file() for name in ("dataset_dict.json", "state.json"))


def _load_local(path, wanted):
    if path.is_dir():
        if _is_saved_dataset(path):
            try:
                loaded = datasets.load_from_disk(str(path))
            except Exception as err:
                raise SourceError(f"{path}: not a readable Dataset.save_to_disk directory ({err})") from None
            if isinstance(loaded, datasets.Dataset):
                loaded = datasets.DatasetDict({wanted[0]: loaded})
            return Loaded(dict(loaded), {name: f"{path} (split '{name}')" for name in loaded}, available=list(loaded))
        # A folder of data files (train.jsonl, test.parquet, ...): the same loader as for the hub.
        for file in sorted(path.rglob("*")):
            hidden = any(part.startswith(".") for part in file.relative_to(path).parts)  # as datasets skips them
            if file.suffix.lower() in (".jsonl", ".json", ".csv") and file.is_file() and not hidden:
                _check_utf8(file)
        return _load_hub(str(path), None, None, wanted, label=str(path))
    ds, bad = _load_file(path)
    # One file is one split: the first of dataset.splits.
    return Loaded({wanted[0]: ds}, {wanted[0]: str(path)}, bad)


def _load_hub(name, subset, revision, wanted, label):
    """Hub data set by id (or a local folder of data files, which datasets resolves the same way)."""
    try:
        available = datasets.get_dataset_split_names(name, subset, revision=revision)
    except Exception as err:
        raise SourceError(f"dataset.source: cannot open {label}{f' (subset {subset})' if subset else ''}: {err}") from None
    names = [split for split in wanted if split in available]
    if wanted[0] not in available:
        raise SourceError(f"dataset.splits: no split '{wanted[0]}' in {label} (has: {', '.join(available)})")
    try:
        loaded = datasets.load_dataset(name, subset, split=names, revision=revision)
    except Exception as err:
        raise SourceError(f"dataset.source: cannot load {label} splits {names}: {err}") from None
    where = f"{label}{f' subset {subset}' if subset else ''}{f'@{revision}' if revision else ''}"
    origin = {split: f"{where} (split '{split}')" for split in names}
    return Loaded(dict(zip(names, loaded)), origin, available=available)


def _load(spec):
    source, wanted = spec["source"], list(spec["splits"])
    if source == "builtin":
        rows = build_conversations(spec["builtin"]["conversations"], spec["builtin"]["seed"])
        return Loaded({wanted[0]: datasets.Dataset.from_list(rows)}, {wanted[0]: "the built-in data set"})
    if source.startswith(HUB_PREFIX):
        name = source[len(HUB_PREFIX) :]
        return _load_hub(name, spec["subset"], spec["revision"], wanted, label=source)
    path = Path(source)
    if not path.exists():
        raise SourceError(f"dataset.source: {path} does not exist")
    return _load_local(path, wanted)


def _with_row_numbers(ds):
    if ROW_COLUMN in ds.column_names:  # e.g. a fetched data set used as a source again
        ds = ds.remove_columns(ROW_COLUMN)
    return ds.add_column(ROW_COLUMN, np.arange(len(ds), dtype=np.int64))


def load_source(spec):
    """Load the source and return (DatasetDict with 'train' and 'test', record for source.json)."""
    loaded = _load(spec)
    source = spec["source"]
    available = loaded.available
    train_name, test_name = (list(spec["splits"]) + [None])[:2]
    if train_name not in loaded.splits:
        raise SourceError(f"dataset.splits: no split '{train_name}' in {source} (has: {', '.join(available)})")
    splits = {name: _with_row_numbers(ds) for name, ds in loaded.splits.items()}
    if len(splits[train_name]) == 0:
        raise SourceError(f"dataset: split '{train_name}' of {source} is empty")
    origin = dict(loaded.origin)
    if test_name in splits:
        if len(splits[test_name]) == 0:
            raise SourceError(f"dataset: split '{test_name}' of {source} is empty")
        raw = datasets.DatasetDict(train=splits[train_name], test=splits[test_name])
        origin = {"train": origin[train_name], "test": origin[test_name]}
    elif test_name is not None and len(available) > 1:
        # The source has other splits, so a missing test split is a mistake, not a request to cut one.
        raise SourceError(f"dataset.splits: no split '{test_name}' in {source} (has: {', '.join(available)})")
    else:  # one split named, or a source with one split: cut the test split from it
        if len(splits[train_name]) < 2:
            raise SourceError(f"dataset: split '{train_name}' of {source} has one row; a test split cannot be cut from it")
        cut = splits[train_name].train_test_split(test_size=spec["test_size"], seed=spec["split_seed"])
        raw = datasets.DatasetDict(train=cut["train"], test=cut["test"])
        origin = {"train": origin[train_name], "test": origin[train_name]}
    record = {
        "spec": spec,
        "rows": {name: len(ds) for name, ds in raw.items()},
        "origin": origin,
        "bad_lines": loaded.bad_lines,
    }
    return raw, record


def load_raw_dataset(spec):
    """Return a DatasetDict with the splits named in spec['splits'] as 'train' and 'test'."""
    return load_source(spec)[0]


def fetch_dataset(spec, out_dir):
    raw, record = load_source(spec)
    with atomic_dir(out_dir) as tmp:
        raw.save_to_disk(str(tmp / "data"))
        write_json(tmp / "source.json", record)


def fetch_model(spec, out_dir):
    """Make the base model available and record where it is in out_dir/source.json."""
    source = spec["source"]
    with atomic_dir(out_dir) as tmp:
        record = {"source": source, "revision": spec["revision"]}
        if source == "builtin":
            from shardtune.inputs.builtin_model import build_model

            record["parameters"] = build_model(tmp / "files", spec["builtin"])
            record["path"] = "files"  # beside source.json: the resources directory can move
        elif source.startswith(HUB_PREFIX):
            from huggingface_hub import snapshot_download

            # Weights stay in the hub cache (shared across runs); we record the snapshot.
            try:
                path = snapshot_download(
                    source[len(HUB_PREFIX) :],
                    revision=spec["revision"],
                    allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"],
                )
            except Exception as err:  # offline, unknown or gated repo, bad revision: one line
                raise SourceError(f"model.source: cannot download {source}: {hub_error(err)}") from None
            record["path"] = str(Path(path).resolve())
            record["commit"] = Path(path).name
        else:
            path = Path(source)
            if not (path / "config.json").is_file():
                raise SourceError(f"model.source: {path} is not a model directory (no config.json)")
            record["path"] = source  # as given; a relative path is from the working directory
        check_model_dir(tmp / "files" if source == "builtin" else record["path"])
        write_json(tmp / "source.json", record)


def hub_error(err):
    """One line for a failed Hub request: what huggingface_hub's error types mean to a user."""
    from huggingface_hub import errors

    if isinstance(err, errors.GatedRepoError):
        return "the repo is gated: accept its terms on the Hub and set HF_TOKEN (or `hf auth login`)"
    if isinstance(err, errors.RepositoryNotFoundError):
        return "no such repo, or it is private and no token with access was given (HF_TOKEN)"
    if isinstance(err, errors.RevisionNotFoundError):
        return "no such revision"
    # HfHubHTTPError is an OSError too, but it is the server's answer: say what it was, below
    unreachable = (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError)
    if isinstance(err, unreachable) and not isinstance(err, errors.HfHubHTTPError):
        return "the Hub cannot be reached and the files are not in the local cache (offline?)"
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def model_path(model_dir):
    """The directory holding the model files for a fetched model, as an absolute path: the
    built-in model's `path` in source.json is relative to source.json's directory, a local
    model's is as the user gave it, a hub snapshot's is absolute."""
    record_path = Path(model_dir) / "source.json"
    record = read_json(record_path)
    path = Path(record["path"])
    if record.get("source") == "builtin":
        path = Path(model_dir) / path  # (an absolute path, written by older versions, stays as it is)
    path = path.resolve()
    if not path.is_dir():
        raise SourceError(f"{record_path}: the model directory {path} does not exist; delete {model_dir} to fetch the model again")
    return str(path)
