"""A user's mistakes, through the snakemake command line: each stops with one line naming the
key, file or module, a non-zero exit, before the expensive steps (data preparation where the
config alone can tell, training where the model files can)."""

import json
import shutil

import pytest
import yaml

from shardtune.config import deep_merge

from conftest import copy_workflow, default_config, jobs_in_dry_run, snakemake

SMALL = {"dataset": {"builtin": {"conversations": 60}}}


def workflow_with(tmp_path, override):
    return copy_workflow(tmp_path / "wf", deep_merge(deep_merge(default_config(), SMALL), override))


def no_token_env(tmp_path):
    return {"HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": "", "HF_HOME": str(tmp_path / "hf-home")}


# --- the config alone tells: nothing runs ------------------------------------------------------

CONFIG_CASES = {
    "optimizer typo": ({"training": {"optim": "adamw_torhc"}}, "config error at 'training.optim': 'adamw_torhc' is not allowed; did you mean 'adamw_torch'"),
    "scheduler typo": ({"training": {"lr_scheduler_type": "cosin"}}, "config error at 'training.lr_scheduler_type': 'cosin' is not allowed; did you mean 'cosine'"),
    "missing data file": ({"dataset": {"source": "my_data.jsonl"}}, "config error at 'runs.demo.dataset.source': my_data.jsonl does not exist"),
    "missing model dir": ({"model": {"source": "models/mine"}}, "config error at 'runs.demo.model.source': models/mine is not a directory"),
    "model dir without config.json": ({"model": {"source": "workflow"}}, "config error at 'runs.demo.model.source': workflow is not a model directory (no config.json)"),
    "empty target list": ({"lora": {"target_modules": []}}, "config error at 'lora.target_modules'"),
    "zero sequence length": ({"data": {"max_seq_len": 0}}, "config error at 'data.max_seq_len'"),
    "negative learning rate": ({"training": {"learning_rate": -1.0e-4}}, "config error at 'training.learning_rate'"),
    "zero batch": ({"training": {"per_device_train_batch_size": 0}}, "config error at 'training.per_device_train_batch_size'"),
    "bad run name": ({"runs": {"my run": {}}}, "config error at 'runs'"),
    "eval steps missing": ({"training": {"eval_strategy": "steps"}}, "config error at 'runs.demo.training.eval_steps'"),
    "push without repo": ({"hub": {"push": True}}, "config error at 'runs.demo.hub.repo_id': hub.push is true but no repo_id"),
    "template name typo": ({"data": {"chat_template_format": "chatmll"}}, "config error at 'runs.demo.data.chat_template_format': 'chatmll' is neither chatml, zephyr, tokenizer"),
    "push without token": ({"hub": {"push": True, "repo_id": "me/demo"}}, "config error at 'runs.demo.hub.push': publishing is on but no Hugging Face token"),
    "flash attention in fp32": ({"model": {"attn_implementation": "flash_attention_2"}}, "config error at 'runs.demo.model.attn_implementation': flash_attention_2 needs bf16 or fp16 compute but this run computes in float32"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_a_bad_config_value_stops_before_any_job(tmp_path, case):
    override, message = CONFIG_CASES[case]
    workdir = workflow_with(tmp_path, override)
    result = snakemake(workdir, "--cores", "2", check=False, env=no_token_env(tmp_path))
    assert result.returncode != 0
    assert message in result.stdout, result.stdout[-2000:]
    assert not (workdir / "results").exists() and not (workdir / "resources").exists()


def test_no_runs_is_an_error_not_the_demo(tmp_path):
    workdir = workflow_with(tmp_path, {})
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    (workdir / "config.yaml").write_text(yaml.safe_dump({**config, "runs": {}}))
    result = snakemake(workdir, "--cores", "2", check=False)
    assert result.returncode != 0
    assert "config error at 'runs': config.yaml names no run" in result.stdout, result.stdout[-2000:]


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    workdir = workflow_with(tmp_path, {})
    (workdir / "config.yaml").write_text("model:\n  source: builtin\n lora: {r: 4}\n")
    result = snakemake(workdir, "--cores", "2", check=False)
    assert result.returncode != 0
    assert "config error in config.yaml: line 3, column 2" in result.stdout, result.stdout[-2000:]
    assert not (workdir / "results").exists()


# --- layered config files ----------------------------------------------------------------------


def planned_runs(output):
    return {line.split("run=")[1].split(",")[0].strip() for line in output.splitlines() if "wildcards: run=" in line}


@pytest.mark.parametrize("files", [["mine.yaml"], ["config.yaml", "mine.yaml"]])
def test_a_config_file_naming_runs_replaces_the_demo(tmp_path, files):
    workdir = workflow_with(tmp_path, {})
    (workdir / "mine.yaml").write_text(yaml.safe_dump({"lora": {"r": 4}, "runs": {"mine": {}}}))
    result = snakemake(workdir, "-n", "--cores", "2", "--configfile", *files)
    assert planned_runs(result.stdout) == {"mine"}, result.stdout[-3000:]


def test_a_config_file_without_runs_keeps_the_earlier_runs(tmp_path):
    workdir = workflow_with(tmp_path, {})
    (workdir / "mine.yaml").write_text(yaml.safe_dump({"lora": {"r": 4}}))
    result = snakemake(workdir, "-n", "--cores", "2", "--configfile", "config.yaml", "mine.yaml")
    assert planned_runs(result.stdout) == {"demo"}
    assert jobs_in_dry_run(result.stdout)["fsdp_train"] == 1


# --- the model files tell: stops before training -----------------------------------------------


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    """A small model directory as a user brings one (weights, config, tokenizer)."""
    from shardtune.config import resolve_runs
    from shardtune.inputs.builtin_model import build_model

    path = tmp_path_factory.mktemp("model") / "files"
    build_model(path, resolve_runs({})["demo"]["model"]["builtin"])
    return path


def broken_copy(local_model, tmp_path, breaks):
    model = tmp_path / "model"
    shutil.copytree(local_model, model)
    breaks(model)
    return model


def truncate_weights(model):
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])


def drop_tokenizer(model):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (model / name).unlink(missing_ok=True)


def corrupt_config(model):
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": ')


def drop_weights(model):
    (model / "model.safetensors").unlink()


MODEL_FILE_CASES = {
    "truncated weights": (truncate_weights, "model.safetensors: truncated:"),
    "no tokenizer": (drop_tokenizer, "has no tokenizer transformers can load"),
    "corrupt config.json": (corrupt_config, "config.json:"),
    "no weights": (drop_weights, "has no weights (*.safetensors or pytorch_model*.bin)"),
}


def assert_stopped_before_training(workdir, result, message, prepared=True):
    assert result.returncode != 0
    assert message in result.stdout, result.stdout[-3000:]
    assert not (workdir / "results/demo/train").exists()
    train_log = workdir / "logs/fsdp_train/demo.log"
    assert not train_log.exists() or "accelerate.commands.launch" not in train_log.read_text()  # no rank started
    prepared_dir = workdir / "resources/prepared"
    if not prepared and prepared_dir.exists():  # nothing prepared, not even a hidden temporary
        assert not list(prepared_dir.iterdir())
    # one line, not a traceback, on the console
    assert "Traceback" not in result.stdout


@pytest.mark.parametrize("case", MODEL_FILE_CASES)
def test_a_broken_model_directory_stops_at_fetching_it(local_model, tmp_path, case):
    breaks, message = MODEL_FILE_CASES[case]
    model = broken_copy(local_model, tmp_path, breaks)
    workdir = workflow_with(tmp_path, {"model": {"source": str(model)}})
    result = snakemake(workdir, "--cores", "2", "train", check=False)
    assert_stopped_before_training(workdir, result, f"ERROR: model.source: {model}", prepared=False)
    assert message in result.stdout
    assert not (workdir / "resources/models").exists() or not list((workdir / "resources/models").iterdir())


def test_an_unreachable_hub_model_is_one_line(tmp_path):
    workdir = workflow_with(tmp_path, {"model": {"source": "hf:someone/no-such-model"}})
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = snakemake(workdir, "--cores", "2", "train", check=False, env=env)
    assert_stopped_before_training(
        workdir, result, "ERROR: model.source: cannot download hf:someone/no-such-model: the Hub cannot be reached", prepared=False
    )


SETTINGS_CASES = {
    # a typo beside a right name: PEFT would train the right one and record the typo
    "one target misspelled": ({"lora": {"target_modules": ["q_proj", "v_projj"]}}, "config error at 'lora.target_modules': 'v_projj' matches no module of the model (its linear layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)"),
    "longer than the model": ({"data": {"max_seq_len": 4096}}, "config error at 'data.max_seq_len': 4096 is more than the model's max_position_embeddings (2048)"),
}


@pytest.mark.parametrize("case", SETTINGS_CASES)
def test_settings_that_do_not_fit_the_model_stop_before_training(tmp_path, case):
    override, message = SETTINGS_CASES[case]
    workdir = workflow_with(tmp_path, override)
    result = snakemake(workdir, "--cores", "2", "train", check=False)
    assert_stopped_before_training(workdir, result, f"ERROR: {message}")


def test_flash_attention_without_a_gpu_stops_before_the_ranks_start(tmp_path):
    workdir = workflow_with(tmp_path, {"model": {"attn_implementation": "flash_attention_2"}, "training": {"bf16": True}})
    result = snakemake(workdir, "--cores", "2", "train", check=False)
    assert_stopped_before_training(
        workdir, result, "ERROR: model.attn_implementation: flash_attention_2 cannot run here: flash-attn is not installed; no GPU visible"
    )


def test_a_training_failure_shows_one_line_on_the_console(tmp_path):
    """A rank that raises (an optimizer whose package is not installed): the console gets the
    exception's line and where the log is; every rank's traceback stays in the log."""
    workdir = workflow_with(tmp_path, {"training": {"max_steps": 1, "optim": "galore_adamw"}})
    result = snakemake(workdir, "--cores", "2", "train", check=False)
    assert result.returncode != 0
    assert "ERROR: training failed (exit 1): ImportError: " in result.stdout, result.stdout[-3000:]
    assert "galore" in result.stdout.split("ERROR: training failed")[1].splitlines()[0]
    assert "Traceback" not in result.stdout
    log = (workdir / "logs/fsdp_train/demo.log").read_text()
    assert log.count("Traceback (most recent call last)") >= 2  # each rank's, and the launcher's
    assert not (workdir / "results/demo/train/done.json").exists()


# --- the data files tell: stops in fetching or preparing them, before training ---------------

GOOD_ROW = {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}


def data_rows(n, bad=None):
    rows = [json.dumps({"messages": [{"role": "user", "content": f"echo {i}"}, {"role": "assistant", "content": str(i)}]}) for i in range(n)]
    if bad is not None:
        rows[bad[0]] = bad[1]
    return "\n".join(rows) + "\n"


def test_a_row_with_a_number_for_content_is_named_by_its_line_and_no_other_row_changes(tmp_path):
    # "243" and "[1, 2]" are strings and stay strings; only line 7 is bad
    bad = json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "5"}]})
    workdir = workflow_with(tmp_path, {"dataset": {"source": "rows.jsonl"}})
    text = data_rows(40, bad=(6, bad)).replace('"content": "12"', '"content": "243"').replace('"content": "13"', '"content": "[1, 2]"')
    (workdir / "rows.jsonl").write_text(text)
    result = snakemake(workdir, "--cores", "2", "train", check=False)
    assert_stopped_before_training(workdir, result, "ERROR: rows.jsonl, row 6 (line 7): non-string content: messages[0] (user) has int content", prepared=False)
    assert "non-string content" in result.stdout and "more bad rows" not in result.stdout

    # with skip, exactly that row is dropped, and the console says so
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["data"]["on_bad_row"] = "skip"
    config["runs"]["demo"]["training"]["max_steps"] = 1
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir, "--cores", "2", "data")
    assert "prepare_data: dropped 1 row" in result.stdout and "non-string content" in result.stdout, result.stdout[-3000:]
    stats = json.loads(next((workdir / "resources/prepared").glob("*/stats.json")).read_text())
    assert sum(s["conversations_out"] for s in stats["splits"].values()) == 39


def test_bytes_that_are_not_utf8_stop_the_fetch_naming_file_and_line(tmp_path):
    workdir = workflow_with(tmp_path, {"dataset": {"source": "rows.jsonl"}})
    lines = data_rows(20).encode().split(b"\n")
    lines[4] = lines[4].replace(b"echo", b"ech\xff")
    (workdir / "rows.jsonl").write_bytes(b"\n".join(lines))
    result = snakemake(workdir, "--cores", "2", "train", check=False)
    assert_stopped_before_training(workdir, result, "rows.jsonl: line 5: not UTF-8 (byte 0xff", prepared=False)
    assert not (workdir / "resources/datasets").exists() or not list((workdir / "resources/datasets").iterdir())


def test_a_template_with_a_jinja_syntax_error_is_one_line_naming_it(tmp_path):
    workdir = workflow_with(tmp_path, {"data": {"chat_template_format": "mine.jinja"}})
    (workdir / "mine.jinja").write_text("{% for m in messages %}{% generation %}\n{{ m['content'] }\n{% endgeneration %}{% endfor %}")
    result = snakemake(workdir, "--cores", "2", "train", check=False)
    assert_stopped_before_training(workdir, result, "ERROR: data.chat_template_format: mine.jinja: line 2: Jinja syntax error", prepared=False)
    assert "bad rows" not in result.stdout
