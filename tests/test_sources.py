"""Data set sources: built-in, local files (JSONL, JSON, Parquet, CSV), save_to_disk and
data-file directories, and hub ids (the real datasets calls, checked without network); and
where a fetched model's files are found."""

import copy
import json
import shutil

import datasets
import pytest
from transformers import AutoTokenizer

from shardtune.data.templates import CHATML
from shardtune.inputs.sources import (
    ROW_COLUMN,
    SourceError,
    fetch_dataset,
    fetch_model,
    load_raw_dataset,
    load_source,
    model_path,
)
from shardtune.io import read_json

from data_fixtures import DEFAULTS, chat, dataset_spec, write_jsonl

ROWS = [chat(f"q{i}", f"a{i}") for i in range(20)]


def test_builtin_source_is_split_and_deterministic():
    raw = load_raw_dataset(dataset_spec("builtin", builtin={"conversations": 50, "seed": 3}))
    again = load_raw_dataset(dataset_spec("builtin", builtin={"conversations": 50, "seed": 3}))
    assert set(raw) == {"train", "test"}
    assert (len(raw["train"]), len(raw["test"])) == (45, 5)
    assert list(raw["train"]["messages"]) == list(again["train"]["messages"])
    # Every row keeps its source row number, so errors can name it after the shuffle.
    rows = sorted([*raw["train"][ROW_COLUMN], *raw["test"][ROW_COLUMN]])
    assert rows == list(range(50))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_local_files_load(tmp_path, suffix):
    path = tmp_path / f"chats{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, ROWS)
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".parquet":
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    else:  # CSV cannot hold lists: messages as JSON text (the prepare step parses it)
        datasets.Dataset.from_dict({"messages": [json.dumps(r["messages"]) for r in ROWS]}).to_csv(str(path), index=False)
    raw, record = load_source(dataset_spec(path, test_size=0.25))
    assert (len(raw["train"]), len(raw["test"])) == (15, 5)
    assert record["origin"] == {"train": str(path), "test": str(path)}
    first = raw["train"].sort(ROW_COLUMN)[0]["messages"]
    assert (json.loads(first) if suffix == ".csv" else first) == ROWS[0]["messages"]


def test_save_to_disk_directories(tmp_path):
    both = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:15]), test=datasets.Dataset.from_list(ROWS[15:]))
    both.save_to_disk(str(tmp_path / "dict"))
    raw = load_raw_dataset(dataset_spec(tmp_path / "dict"))
    assert (len(raw["train"]), len(raw["test"])) == (15, 5)
    assert raw["test"][0]["messages"] == ROWS[15]["messages"]  # the source's own test split, not a cut

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    raw = load_raw_dataset(dataset_spec(tmp_path / "single", test_size=0.1))
    assert (len(raw["train"]), len(raw["test"])) == (18, 2)


def test_directory_of_data_files_uses_its_split_names(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS[:12])
    write_jsonl(folder / "test.jsonl", ROWS[12:])
    raw, record = load_source(dataset_spec(folder))
    assert (len(raw["train"]), len(raw["test"])) == (12, 8)
    assert "split 'test'" in record["origin"]["test"]


def test_hub_source_passes_id_subset_revision_and_splits(monkeypatch):
    calls = {}

    def split_names(path, config_name=None, revision=None, **kwargs):
        calls["names"] = (path, config_name, revision)
        return ["train_sft", "test_sft", "train_gen"]

    def load_dataset(path, name=None, split=None, revision=None, **kwargs):
        calls["load"] = (path, name, split, revision)
        return [datasets.Dataset.from_list(ROWS[:12]), datasets.Dataset.from_list(ROWS[12:])]

    monkeypatch.setattr(datasets, "get_dataset_split_names", split_names)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    spec = dataset_spec("hf:org/chats", subset="default", revision="v1.0", splits=["train_sft", "test_sft"])
    raw, record = load_source(spec)
    assert calls["names"] == ("org/chats", "default", "v1.0")
    assert calls["load"] == ("org/chats", "default", ["train_sft", "test_sft"], "v1.0")
    assert (len(raw["train"]), len(raw["test"])) == (12, 8)
    assert record["origin"]["test"] == "hf:org/chats subset default@v1.0 (split 'test_sft')"

    # A split the data set does not have is an error naming the ones it has.
    with pytest.raises(SourceError, match=r"no split 'test' in hf:org/chats \(has: train_sft, test_sft, train_gen\)"):
        load_source(dataset_spec("hf:org/chats", splits=["train_sft", "test"]))
    with pytest.raises(SourceError, match="no split 'train' in hf:org/chats"):
        load_source(dataset_spec("hf:org/chats"))


def test_hub_source_with_train_only_is_cut_by_test_size(monkeypatch):
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda *a, **k: ["train"])
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, split=None, **k: [datasets.Dataset.from_list(ROWS)])
    raw = load_raw_dataset(dataset_spec("hf:org/train-only", test_size=0.2, split_seed=7))
    assert (len(raw["train"]), len(raw["test"])) == (16, 4)


def test_hub_code_path_runs_for_real_on_a_local_folder(tmp_path):
    # datasets resolves a local folder exactly like a hub repo of data files: the same two calls.
    write_jsonl(tmp_path / "train.jsonl", ROWS[:15])
    write_jsonl(tmp_path / "test.jsonl", ROWS[15:])
    raw, record = load_source(dataset_spec(f"hf:{tmp_path}"))
    assert (len(raw["train"]), len(raw["test"])) == (15, 5)
    assert record["origin"]["train"].endswith("(split 'train')")


def test_hub_errors_name_the_source(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "get_dataset_split_names", offline)
    with pytest.raises(SourceError, match="cannot open hf:org/missing: no network"):
        load_raw_dataset(dataset_spec("hf:org/missing"))


def test_invalid_json_lines_are_recorded_with_line_numbers(tmp_path):
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps(r) for r in ROWS[:5]]
    lines[2] = '{"messages": [oops'
    lines.insert(4, "")
    lines.append("[1, 2]")
    path.write_text("\n".join(lines) + "\n")
    raw, record = load_source(dataset_spec(path))
    assert len(raw["train"]) + len(raw["test"]) == 4
    assert [(b["line"], b["reason"].split(" (")[0]) for b in record["bad_lines"]] == [
        (3, "invalid JSON"),
        (7, "expected a JSON object, got list"),
    ]


def test_mixed_types_load_so_that_each_row_can_be_checked(tmp_path):
    # A number where text belongs, a string where a list belongs, next to a bad line: the rows
    # still load (datasets' Json type) and the prepare step names the bad ones.
    odd = [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([json.dumps(chat()), json.dumps({"messages": odd}), "{bad", json.dumps({"messages": "text"})]) + "\n")
    raw, record = load_source(dataset_spec(path, test_size=0.34))
    values = {row[ROW_COLUMN]: row["messages"] for split in raw.values() for row in split}
    assert values == {0: chat()["messages"], 1: odd, 2: "text"}
    assert [b["line"] for b in record["bad_lines"]] == [3]


def test_mixed_type_fields_keep_every_value_as_written(tmp_path):
    # datasets' own Json encoding would turn the string "243" into the number 243.
    texts = ["243", "[1, 2]", '{"a": 1}', "null", "true", "x"]
    rows = [{**chat("q", text), "id": text} for text in texts * 10]
    rows[3]["messages"][1]["content"], rows[4]["id"] = 7, 7
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    raw, record = load_source(dataset_spec(path))
    values = {row[ROW_COLUMN]: {"messages": row["messages"], "id": row["id"]} for split in raw.values() for row in split}
    assert [values[i] for i in range(len(rows))] == rows
    assert record["bad_lines"] == []


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.with_suffix(".txt").write_text("x") and p.with_suffix(".txt"), "unknown file type"),
        (lambda p: p.write_text("") and p, "is empty"),
        (lambda p: p.write_text("\n\n") and p, r"is empty|no usable row"),
        (lambda p: p.write_text("not json\n") and p, "no usable row .*line 1: invalid JSON"),
        (lambda p: write_jsonl(p, ROWS[:1]), "has one row; a test split cannot be cut"),
    ],
)
def test_unusable_files(tmp_path, make, message):
    path = tmp_path / "data.jsonl"
    made = make(path) or path
    with pytest.raises(SourceError, match=message):
        load_raw_dataset(dataset_spec(made))


def test_missing_and_empty_splits(tmp_path):
    both = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:10]), validation=datasets.Dataset.from_list(ROWS[10:]))
    both.save_to_disk(str(tmp_path / "tv"))
    with pytest.raises(SourceError, match=r"no split 'test' in .*tv \(has: train, validation\)"):
        load_raw_dataset(dataset_spec(tmp_path / "tv"))
    assert len(load_raw_dataset(dataset_spec(tmp_path / "tv", splits=["train", "validation"]))["test"]) == 10
    with pytest.raises(SourceError, match="no split 'training'"):
        load_raw_dataset(dataset_spec(tmp_path / "tv", splits=["training", "validation"]))

    folder = tmp_path / "files"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    write_jsonl(folder / "test.jsonl", [])
    with pytest.raises(SourceError, match="files"):  # datasets itself refuses an empty data file
        load_raw_dataset(dataset_spec(folder))


def test_empty_splits_are_refused(monkeypatch):
    sizes = {}
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda *a, **k: ["train", "test"])
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, split=None, **k: [datasets.Dataset.from_list(ROWS[: sizes[s]]) for s in split]
    )
    sizes.update(train=0, test=5)
    with pytest.raises(SourceError, match="split 'train' of hf:org/x is empty"):
        load_raw_dataset(dataset_spec("hf:org/x"))
    sizes.update(train=5, test=0)
    with pytest.raises(SourceError, match="split 'test' of hf:org/x is empty"):
        load_raw_dataset(dataset_spec("hf:org/x"))


def test_fetch_writes_all_or_nothing(tmp_path):
    path = write_jsonl(tmp_path / "ok.jsonl", ROWS)
    fetch_dataset(dataset_spec(path), tmp_path / "out")
    record = read_json(tmp_path / "out" / "source.json")
    assert record["rows"] == {"train": 18, "test": 2}
    assert datasets.load_from_disk(str(tmp_path / "out" / "data"))["train"].num_rows == 18

    with pytest.raises(SourceError):
        fetch_dataset(dataset_spec(tmp_path / "missing.jsonl"), tmp_path / "failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.jsonl", "out"]


@pytest.mark.parametrize("suffix, column", [(".jsonl", 16), (".json", 16), (".csv", 6)])
def test_bytes_that_are_not_utf8_stop_the_fetch_with_their_line(tmp_path, suffix, column):
    # Line 17 holds "café " (é: two bytes, one column) and then a byte that is not UTF-8.
    if suffix == ".csv":
        lines = [b"text"] + [b"row %d" % i for i in range(1, 30)]
        lines[16] = b"caf\xc3\xa9 \xff"
    else:
        lines = [json.dumps({"text": f"row {i}"}).encode() for i in range(30)]
        lines[16] = b'{"text": "caf\xc3\xa9 \xff"}'
    body = b"[" + b",\n".join(lines) + b"]" if suffix == ".json" else b"\n".join(lines)
    path = tmp_path / f"data{suffix}"
    path.write_bytes(body + b"\n")
    with pytest.raises(SourceError) as err:
        fetch_dataset(dataset_spec(path), tmp_path / "out")
    assert str(err.value) == f"{path}: line 17: not UTF-8 (byte 0xff at column {column})"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]

    folder = tmp_path / "files"  # a folder of data files is checked the same way
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    (folder / "test.jsonl").write_bytes(b'{"messages": "\xc3"}\n')
    with pytest.raises(SourceError, match=r"test.jsonl: line 1: not UTF-8 \(byte 0xc3 at column 15\)$"):
        load_source(dataset_spec(folder))


def test_one_named_split_always_cuts_the_test_split(tmp_path):
    both = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:10]), test=datasets.Dataset.from_list(ROWS[10:]))
    both.save_to_disk(str(tmp_path / "dict"))
    raw = load_raw_dataset(dataset_spec(tmp_path / "dict", splits=["train"], test_size=0.2))
    assert (len(raw["train"]), len(raw["test"])) == (8, 2)


def test_a_fetched_data_set_can_be_a_source_again(tmp_path):
    fetch_dataset(dataset_spec(write_jsonl(tmp_path / "ok.jsonl", ROWS)), tmp_path / "first")
    raw = load_raw_dataset(dataset_spec(tmp_path / "first" / "data"))
    assert sorted(raw["test"][ROW_COLUMN]) == list(range(len(raw["test"])))  # renumbered for the new source


def test_a_fetched_model_does_not_depend_on_where_the_project_is(tmp_path, monkeypatch):
    project = tmp_path.resolve() / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    fetch_model(copy.deepcopy(DEFAULTS["model"]), "resources/models/builtin")
    # A local model directory, given relative to the working directory: kept as given.
    fetch_model({**copy.deepcopy(DEFAULTS["model"]), "source": "resources/models/builtin/files"}, "resources/models/local")
    assert read_json(project / "resources/models/builtin/source.json")["path"] == "files"
    assert read_json(project / "resources/models/local/source.json")["path"] == "resources/models/builtin/files"

    moved = tmp_path.resolve() / "moved"
    project.rename(moved)
    monkeypatch.chdir(moved)
    files = moved / "resources/models/builtin/files"
    assert model_path(moved / "resources/models/builtin") == model_path("resources/models/local") == str(files)
    assert AutoTokenizer.from_pretrained(model_path("resources/models/builtin")).chat_template == CHATML

    shutil.rmtree(files)
    with pytest.raises(SourceError) as err:
        model_path("resources/models/local")
    assert str(err.value) == (
        f"resources/models/local/source.json: the model directory {files} does not exist; "
        "delete resources/models/local to fetch the model again"
    )
