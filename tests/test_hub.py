"""Publishing to the Hugging Face Hub: the real huggingface_hub client code against a local
fake hub on 127.0.0.1 (tests/fake_hub.py). Unit tests use a small fake adapter directory;
one workflow run checks the rule end to end and that the token never leaks."""

import hashlib
import json
import os
import socket
import time
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard

from shardtune import config as stconfig
from shardtune.errors import UserError
from shardtune.publish import client, every_save, hub, model_card

from fake_hub import FakeHub

TOKEN = "hf_shardtuneCANARY7q2Xk9RmV4"  # recognisable: searched for in every output
BAD_TOKEN = "hf_shardtuneWRONG3ZkP0wq"
REPO = "shardtune-test/demo"


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def settings_for(endpoint, **overrides):
    """A resolved run's settings with hub.push on, fast retries and `overrides` merged in."""
    config = {"hub": {"push": True, "repo_id": REPO, "endpoint": endpoint, "retries": 2, "retry_backoff": 0.01}}
    return stconfig.resolve_runs(stconfig.deep_merge(config, overrides))["demo"]


@pytest.fixture(autouse=True)
def hub_env(monkeypatch, tmp_path):
    """The token from HF_TOKEN only; no login cache, endpoint or offline mode from outside."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    for name in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login-cache" / "token"))


@pytest.fixture
def server():
    with FakeHub(tokens=[TOKEN], read_only=[BAD_TOKEN + "read"]) as fake:
        yield fake


@pytest.fixture
def run_dir(tmp_path):
    """A converted, evaluated run as the workflow leaves it (small, fake weights)."""
    run = tmp_path / "results/demo"
    adapter = run / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/home/someone/models/base", "r": 8, "peft_type": "LORA"})
    )
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(20_000))
    (adapter / "tokenizer.json").write_text('{"model": {}}')
    (adapter / "tokenizer_config.json").write_text("{}")
    (adapter / "conversion.json").write_text(
        json.dumps({"checkpoint": "/home/someone/run/checkpoint-20", "global_step": 20, "max_abs_logit_diff": 2e-7})
    )
    (run / "eval").mkdir()
    metrics = {
        "base": {"eval_loss": 6.25, "perplexity": 518.01, "tokens": 1000},
        "tuned": {"eval_loss": 3.5, "perplexity": 33.12, "tokens": 1000},
    }
    (run / "eval/metrics.json").write_text(json.dumps(metrics))
    (run / "eval/loss.png").write_bytes(b"\x89PNG fake plot")
    (run / "train").mkdir()
    (run / "train/done.json").write_text(
        json.dumps({"global_step": 20, "train_loss": 4.2, "num_processes": 2, "fsdp_version": 2})
    )
    return run


def publish(settings, run_dir, log=None, **kwargs):
    lines = []
    record = hub.publish(
        settings,
        run="demo",
        adapter_dir=run_dir / "adapter",
        metrics=run_dir / "eval/metrics.json",
        train_done=run_dir / "train/done.json",
        out_dir=run_dir / "hub",
        log=(log or lines.append),
        **kwargs,
    )
    return record, lines


def one_line_error(excinfo, kind):
    err = excinfo.value
    assert type(err) is kind, (type(err), err)
    assert isinstance(err, UserError)
    message = str(err)
    assert "\n" not in message and TOKEN not in message and BAD_TOKEN not in message
    return message


# --- publishing ------------------------------------------------------------------------


def test_publish_creates_private_repo_and_files_arrive_intact(server, run_dir):
    record, log = publish(settings_for(server.url), run_dir)
    repo = server.repos[REPO]
    assert repo.private and len(repo.commits) == 1
    files = repo.files
    # everything recorded is on the hub with the recorded hash, and nothing else
    assert set(files) == set(record["files"])
    for path, entry in record["files"].items():
        assert sha256(files[path]) == entry["sha256"] and len(files[path]) == entry["size"]
    adapter = run_dir / "adapter"
    assert files["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    assert files["tokenizer.json"] == (adapter / "tokenizer.json").read_bytes()
    assert files["plots/loss.png"] == (run_dir / "eval/loss.png").read_bytes()
    assert files["README.md"] == (run_dir / "hub/README.md").read_bytes()
    assert "conversion.json" not in files  # a local record with local paths
    assert record["commit"] == repo.sha and record["new_commit"] and record["private"]
    assert record["url"] == f"{server.url}/{REPO}"
    assert json.loads((run_dir / "hub/upload.json").read_text()) == record
    assert any("uploading 6 files" in line for line in log)


@pytest.fixture
def lfs_server(monkeypatch):
    """A hub that takes the weights through LFS (the client's path when xet is off)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with FakeHub(tokens=[TOKEN], lfs_suffixes=(".safetensors",)) as fake:
        yield fake


def test_weights_go_through_lfs_and_are_verified_by_their_sha256(lfs_server, run_dir):
    settings = settings_for(lfs_server.url)
    record, _ = publish(settings, run_dir)
    repo = lfs_server.repos[REPO]
    weights = (run_dir / "adapter/adapter_model.safetensors").read_bytes()
    assert repo.files["adapter_model.safetensors"] == weights
    assert len(lfs_server.calls("POST", r"\.git/info/lfs/objects/batch$")) == 1 and len(lfs_server.calls("PUT", "^/lfs/")) == 1
    assert record["files"]["adapter_model.safetensors"]["sha256"] == sha256(weights)
    # a rerun finds the LFS file unchanged (by its sha256) and commits nothing
    again, _ = publish(settings, run_dir)
    assert len(repo.commits) == 1 and not again["new_commit"] and len(lfs_server.calls("PUT", "^/lfs/")) == 1
    # the check after a commit compares LFS content by sha256: a corrupted object is caught
    repo.files["adapter_model.safetensors"] = weights[:-1] + bytes([weights[-1] ^ 1])
    api = hub.hub_api(lfs_server.url, TOKEN)
    items = hub.adapter_items(run_dir / "adapter")
    with pytest.raises(hub.HubIntegrityError, match="adapter_model.safetensors on the hub differs"):
        hub.verify(api, REPO, "main", items)


def test_rerun_commits_nothing_when_the_hub_has_the_files(server, run_dir):
    settings = settings_for(server.url)
    first, _ = publish(settings, run_dir)
    second, _ = publish(settings, run_dir)
    repo = server.repos[REPO]
    assert len(repo.commits) == 1
    assert second["commit"] == first["commit"] and not second["new_commit"]
    # a changed file: one new commit, carrying that file only
    (run_dir / "adapter/adapter_model.safetensors").write_bytes(os.urandom(20_000))
    third, _ = publish(settings, run_dir)
    assert len(repo.commits) == 2 and third["new_commit"]
    assert repo.commits[-1][3] == ["adapter_model.safetensors"]


def test_lost_commit_response_is_retried_without_a_duplicate_commit(server, run_dir):
    server.fail("POST", r"/commit/", 500, apply=True)  # the commit lands, the answer is lost
    record, log = publish(settings_for(server.url), run_dir)
    repo = server.repos[REPO]
    assert len(repo.commits) == 1 and record["commit"] == repo.sha
    assert any("HTTP 500" in line and "retrying" in line for line in log)


def test_transient_server_errors_are_retried_with_backoff(server, run_dir):
    server.fail("POST", r"^/api/repos/create$", 503, times=2)
    record, log = publish(settings_for(server.url, hub={"retry_backoff": 0.05}), run_dir)
    assert len(server.calls("POST", r"^/api/repos/create$")) == 3
    assert [line.rsplit("retrying in ", 1)[1] for line in log if "retrying in" in line] == ["0.05 s", "0.1 s"]
    assert server.repos[REPO].private and record["commit"] == server.repos[REPO].sha


def test_persistent_server_error_gives_up_with_one_line(server, run_dir):
    server.fail("POST", r"^/api/repos/create$", 503, times=100)
    with pytest.raises(hub.HubError) as excinfo:
        publish(settings_for(server.url), run_dir)
    message = one_line_error(excinfo, client.HubServerError)
    assert "HTTP 503" in message and server.url in message and "3 attempts" in message
    assert len(server.calls("POST", r"^/api/repos/create$")) == 3
    assert not (run_dir / "hub/upload.json").exists()


def test_rejected_token_is_a_one_line_error_and_not_retried(server, run_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", BAD_TOKEN)
    with pytest.raises(hub.HubError) as excinfo:
        publish(settings_for(server.url), run_dir)
    message = one_line_error(excinfo, client.HubAuthError)
    assert "rejected the token" in message and "401" in message and "HF_TOKEN" in message
    assert len(server.requests) == 1  # not retried
    assert REPO not in server.repos and not (run_dir / "hub/upload.json").exists()


def test_token_without_write_access_is_refused(server, run_dir, monkeypatch):
    server.add_repo(REPO, private=True)
    monkeypatch.setenv("HF_TOKEN", BAD_TOKEN + "read")
    with pytest.raises(hub.HubError) as excinfo:
        publish(settings_for(server.url), run_dir)
    message = one_line_error(excinfo, client.HubAuthError)
    assert "403" in message and "write access" in message
    assert server.repos[REPO].commits == []


def test_missing_token_fails_before_any_request(server, run_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(hub.HubError) as excinfo:
        publish(settings_for(server.url), run_dir)
    message = one_line_error(excinfo, client.HubAuthError)
    assert "HF_TOKEN" in message and "hf auth login" in message
    assert server.requests == []


def test_token_from_the_login_cache(server, run_dir, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    cache = tmp_path / "hf-home/token"
    cache.parent.mkdir()
    cache.write_text(TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache))
    record, _ = publish(settings_for(server.url), run_dir)
    assert record["commit"] == server.repos[REPO].sha


def test_unreachable_endpoint_is_a_one_line_error(run_dir):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(hub.HubError) as excinfo:
        publish(settings_for(f"http://127.0.0.1:{port}"), run_dir)
    message = one_line_error(excinfo, client.HubUnreachableError)
    assert f"cannot reach the hub at http://127.0.0.1:{port}" in message
    assert time.monotonic() - start < 20


def test_existing_public_repo_is_refused_when_private_is_asked(server, run_dir):
    server.add_repo(REPO, private=False)
    with pytest.raises(hub.HubError) as excinfo:
        publish(settings_for(server.url), run_dir)
    message = one_line_error(excinfo, hub.HubPrivacyError)
    assert REPO in message and "hub.private" in message
    assert server.repos[REPO].commits == []
    # asked for a public repo: published there
    record, _ = publish(settings_for(server.url, hub={"private": False}), run_dir)
    assert record["private"] is False and len(server.repos[REPO].commits) == 1


def test_a_bare_repo_name_goes_under_the_tokens_namespace(server, run_dir):
    record, _ = publish(settings_for(server.url, hub={"repo_id": "llama-sft-lora-fsdp"}), run_dir)
    assert record["repo_id"] == "user/llama-sft-lora-fsdp"
    assert server.repos["user/llama-sft-lora-fsdp"].private and server.repos["user/llama-sft-lora-fsdp"].commits


def test_dry_run_lists_the_upload_and_writes_the_card_without_network(server, run_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    record, log = publish(settings_for(server.url, hub={"dry_run": True}), run_dir)
    assert server.requests == []
    assert record["dry_run"] and "commit" not in record
    assert set(record["files"]) == {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "plots/loss.png",
    }
    assert (run_dir / "hub/README.md").read_text().startswith("---\n")
    assert json.loads((run_dir / "hub/upload.json").read_text()) == record
    text = "\n".join(log)
    assert f"would upload 6 files" in text and f"{server.url}/{REPO}" in text and "no token found" in text
    assert "sha256:" + sha256((run_dir / "adapter/adapter_model.safetensors").read_bytes()) in text


def test_merged_model_and_base_model_id(server, run_dir):
    merged = run_dir / "merged"
    merged.mkdir()
    (merged / "config.json").write_text('{"model_type": "llama"}')
    (merged / "model.safetensors").write_bytes(os.urandom(3000))
    settings = settings_for(server.url, hub={"base_model": "meta-llama/Llama-2-70b-hf"})
    record, _ = publish(settings, run_dir, merged_dir=merged)
    files = server.repos[REPO].files
    assert files["merged/model.safetensors"] == (merged / "model.safetensors").read_bytes()
    assert "merged/config.json" in record["files"]
    # the published adapter config names the base model's hub id; the local file is untouched
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "meta-llama/Llama-2-70b-hf"
    local = json.loads((run_dir / "adapter/adapter_config.json").read_text())
    assert local["base_model_name_or_path"] == "/home/someone/models/base"
    card = files["README.md"].decode()
    assert 'subfolder="merged"' in card and ModelCard(card).data.base_model == "meta-llama/Llama-2-70b-hf"


def test_declared_plots_and_run_info_versions(server, run_dir):
    (run_dir / "eval/learning_rate.png").write_bytes(b"\x89PNG another")
    (run_dir / "eval/run_info.json").write_text(json.dumps({"versions": {"torch": "1.2.3"}}))
    record, _ = publish(
        settings_for(server.url),
        run_dir,
        plots=[run_dir / "eval/learning_rate.png"],
        run_info=run_dir / "eval/run_info.json",
    )
    assert [p for p in record["files"] if p.startswith("plots/")] == ["plots/learning_rate.png"]
    card = server.repos[REPO].files["README.md"].decode()
    assert "| torch | 1.2.3 |" in card and "![learning_rate.png](plots/learning_rate.png)" in card


# --- the model card --------------------------------------------------------------------


def test_model_card_metadata_loading_settings_metrics_and_versions():
    settings = stconfig.resolve_runs(
        {
            "model": {"source": "hf:meta-llama/Llama-2-7b-hf"},
            "dataset": {"source": "hf:smangrul/ultrachat-10k-chatml"},
            "quantization": {"load_in_4bit": True},
            "hub": {
                "push": True,
                "repo_id": "org/llama-qlora",
                "license": "llama2",
                "tags": ["chat"],
                "endpoint": "http://user:secretpass@127.0.0.1:1",
            },
        }
    )["demo"]
    metrics = {
        "base": {"eval_loss": 2.5, "perplexity": 12.18, "tokens": 10},
        "tuned": {"eval_loss": 1.25, "perplexity": 3.49, "tokens": 10},
    }
    text = model_card.render(
        run="demo",
        settings=settings,
        repo_id="org/llama-qlora",
        metrics=metrics,
        done={"global_step": 7, "train_loss": 1.5},
        versions={"torch": "9.9.9", "peft": "8.8.8"},
        plots=["plots/loss.png"],
    )
    data = ModelCard(text).data
    assert data.base_model == "meta-llama/Llama-2-7b-hf" and data.library_name == "peft"
    assert data.license == "llama2" and data.datasets == ["smangrul/ultrachat-10k-chatml"]
    assert {"peft", "lora", "qlora", "chat"} <= set(data.tags)
    assert 'AutoPeftModelForCausalLM.from_pretrained("org/llama-qlora")' in text
    assert 'PeftModel.from_pretrained(base, "org/llama-qlora")' in text
    assert 'AutoModelForCausalLM.from_pretrained("meta-llama/Llama-2-7b-hf")' in text
    assert "| tuned | 1.2500 | 3.490 | 10 |" in text and "![loss.png](plots/loss.png)" in text
    assert "| torch | 9.9.9 |" in text and "| steps trained | 7 |" in text
    assert "private" in text and "hf auth login" in text
    assert "secretpass" not in text and "endpoint" not in text  # the hub section stays out


def test_software_versions_are_installed_versions():
    versions = model_card.software_versions()
    assert versions["huggingface_hub"] == "2.4.0" and "python" in versions


# --- settings --------------------------------------------------------------------------


def test_pushed_runs_need_a_repo_per_pushed_run():
    runs = stconfig.resolve_runs({"runs": {"a": {"hub": {"push": True, "repo_id": "org/a"}}, "b": {}}})
    assert stconfig.pushed_runs(runs) == ["a"]
    runs = stconfig.resolve_runs({"runs": {"a": {"hub": {"push": True}}}})
    with pytest.raises(stconfig.ConfigError, match="'runs.a.hub.repo_id': hub.push is true but no repo_id"):
        stconfig.pushed_runs(runs)
    runs = stconfig.resolve_runs({"hub": {"push": True, "repo_id": "org/x"}, "runs": {"a": {}, "b": {}}})
    with pytest.raises(stconfig.ConfigError, match="org/x is also the repo of run 'a'"):
        stconfig.pushed_runs(runs)
    with pytest.raises(stconfig.ConfigError, match="hub.repo_id"):
        stconfig.resolve_runs({"hub": {"repo_id": "two/slashes/here"}})


def test_wrapped_network_errors_are_recognised():
    import httpx2

    try:
        try:
            raise httpx2.ConnectError("[Errno 111] Connection refused")
        except httpx2.ConnectError as inner:
            raise RuntimeError("Error while uploading 'model.safetensors' to the Hub.") from inner
    except RuntimeError as err:
        error, retry = client.classify(err, "http://127.0.0.1:9", REPO)
    assert isinstance(error, client.HubUnreachableError) and retry
    assert client.classify(KeyError("x"), "http://127.0.0.1:9", REPO) == (None, False)


def test_endpoint_from_config_then_environment(monkeypatch):
    assert hub.resolve_endpoint({"endpoint": None}) == "https://huggingface.co"
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    assert hub.resolve_endpoint({"endpoint": None}) == "http://127.0.0.1:9"
    assert hub.resolve_endpoint({"endpoint": "http://127.0.0.1:8"}) == "http://127.0.0.1:8"
    assert hub.shown_endpoint("https://user:pw@hub.example:8443/x") == "https://hub.example:8443/x"


# --- every_save: checkpoints pushed while training --------------------------------------


def fake_checkpoint(train_dir, step, value):
    """A sharded-format (torch.distributed.checkpoint) checkpoint holding LoRA weights."""
    import torch
    import torch.distributed.checkpoint as dcp

    checkpoint = train_dir / f"checkpoint-{step}"
    state = {"model": {"base_model.model.layers.0.q_proj.lora_A.weight": torch.full((2, 4), float(value))}}
    dcp.save(state, checkpoint_id=str(checkpoint / "pytorch_model_fsdp_0"), no_dist=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return checkpoint


@pytest.fixture
def train_dir(tmp_path):
    train = tmp_path / "train"
    (train / "adapter_config").mkdir(parents=True)
    (train / "adapter_config/adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x", "r": 8}))
    return train


def test_every_save_pushes_each_checkpoint_as_an_adapter(server, train_dir, tmp_path, monkeypatch):
    import tempfile

    import safetensors.torch

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    settings = settings_for(server.url, hub={"strategy": "every_save"})
    log = []
    pusher = every_save.CheckpointPusher(settings, train_dir, run="demo", log=log.append)
    pusher.push(fake_checkpoint(train_dir, 10, 1.0), 10)
    pusher.push(fake_checkpoint(train_dir, 20, 2.0), 20)
    result = pusher.finish()
    assert result["failed"] == [] and result["pushed"][-1] == 20
    repo = server.repos[REPO]
    assert repo.private and "step 20" in repo.commits[-1][1]
    weights = safetensors.torch.load(repo.files["adapter_model.safetensors"])
    assert weights["base_model.model.layers.0.q_proj.lora_A.weight"].eq(2.0).all()
    assert json.loads(repo.files["trainer_state.json"])["global_step"] == 20
    assert "Training in progress: checkpoint of step 20" in repo.files["README.md"].decode()
    assert list(scratch.iterdir()) == []  # staged files are removed once pushed


def test_every_save_checks_token_before_training_and_survives_a_failed_push(server, train_dir, monkeypatch):
    settings = settings_for(server.url, hub={"strategy": "every_save", "retries": 0})
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(client.HubAuthError):
        every_save.CheckpointPusher(settings, train_dir).start()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    log = []
    pusher = every_save.CheckpointPusher(settings, train_dir, log=log.append)
    pusher.start()
    server.fail("POST", r"/commit/", 503)
    pusher.push(fake_checkpoint(train_dir, 10, 1.0), 10)
    assert pusher.finish() == {"pushed": [], "failed": [10]}
    assert any("pushing step 10 failed" in line and "HTTP 503" in line for line in log)


def test_every_save_dry_run_sends_nothing(server, train_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    log = []
    pusher = every_save.CheckpointPusher(
        settings_for(server.url, hub={"strategy": "every_save", "dry_run": True}), train_dir, log=log.append
    )
    pusher.push(train_dir / "checkpoint-10", 10)
    assert pusher.finish() == {"pushed": [], "failed": []}
    assert server.requests == [] and any("would push" in line for line in log)


def test_every_save_callback_for_the_trainer(server, train_dir):
    assert every_save.every_save_callback(settings_for(server.url), train_dir) is None  # strategy: end
    settings = settings_for(server.url, hub={"strategy": "every_save"})
    del settings["dataset"]  # the card does without it
    callback = every_save.every_save_callback(settings, train_dir, run="demo", log=lambda *a: None)
    from transformers import TrainerCallback

    assert isinstance(callback, TrainerCallback)
    fake_checkpoint(train_dir, 5, 3.0)
    args = SimpleNamespace(output_dir=str(train_dir))
    main, other = SimpleNamespace(is_world_process_zero=True, global_step=5), SimpleNamespace(
        is_world_process_zero=False, global_step=5
    )
    for state in (other, main):
        callback.on_train_begin(args, state, None)
        callback.on_save(args, state, None, processing_class=None)
        callback.on_train_end(args, state, None)
    assert len(server.repos[REPO].commits) == 1
    assert len(server.calls("POST", r"^/api/repos/create$")) == 1  # only the main process talks to the hub


# --- the workflow, end to end -----------------------------------------------------------

OUTPUT_DIRS = ("results", "resources", "logs", ".snakemake", "benchmarks")


def files_containing(workdir, needle):
    found = []
    for name in OUTPUT_DIRS:
        for path in (workdir / name).rglob("*"):
            if path.is_file() and needle.encode() in path.read_bytes():
                found.append(str(path.relative_to(workdir)))
    return found


@pytest.fixture(scope="module")
def published(demo_run, tmp_path_factory):
    """The default run with hub.push on, published against the fake hub with a recognisable
    token in HF_TOKEN (the create call fails once with 503, to be retried). It starts from a
    copy of the finished default run: publishing settings rerun no training."""
    from conftest import copy_run, default_config, snakemake

    tmp = tmp_path_factory.mktemp("hub-workflow")
    config = default_config()
    config["hub"] = {"push": True, "repo_id": REPO, "retry_backoff": 0.05, "tags": ["shardtune-test"]}
    workdir = copy_run(demo_run, tmp / "work", config)
    with FakeHub(tokens=[TOKEN]) as server:
        server.fail("POST", r"^/api/repos/create$", 503)
        env = {
            "HF_TOKEN": TOKEN,
            "HF_HOME": str(tmp / "hf-home"),
            "HF_ENDPOINT": server.url,
            "HF_HUB_OFFLINE": "0",
        }
        result = snakemake(workdir, "--cores", "2", "all", "upload", env=env)
        yield SimpleNamespace(workdir=workdir, server=server, output=result.stdout, env=env, snakemake=snakemake)


def test_workflow_publishes_the_run(published):
    workdir, server = published.workdir, published.server
    assert "rule fsdp_train:" not in published.output  # publishing settings retrain nothing
    record = json.loads((workdir / "results/demo/hub/upload.json").read_text())
    repo = server.repos[REPO]
    assert repo.private and len(repo.commits) == 1 and record["commit"] == repo.sha
    assert set(repo.files) == set(record["files"])
    for path, entry in record["files"].items():
        assert sha256(repo.files[path]) == entry["sha256"]
    adapter = workdir / "results/demo/adapter"
    assert repo.files["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    card = repo.files["README.md"].decode()
    assert card == (workdir / "results/demo/hub/README.md").read_text()
    metrics = json.loads((workdir / "results/demo/eval/metrics.json").read_text())
    assert f"{metrics['tuned']['eval_loss']:.4f}" in card and "shardtune-test" in ModelCard(card).data.tags
    log = (workdir / "logs/push_to_hub/demo.log").read_text()
    assert "HTTP 503" in log and "retrying" in log


def test_workflow_never_writes_or_prints_the_token(published):
    assert TOKEN not in published.output
    assert files_containing(published.workdir, TOKEN) == []
    repo = published.server.repos[REPO]
    assert not [p for p, data in repo.files.items() if TOKEN.encode() in data]


def test_workflow_rerun_after_a_failed_upload_completes_it_without_duplicates(published):
    workdir, server, run = published.workdir, published.server, published.snakemake
    first = json.loads((workdir / "results/demo/hub/upload.json").read_text())
    bad_env = {**published.env, "HF_TOKEN": BAD_TOKEN}
    failed = run(workdir, "--cores", "2", "upload", "--forcerun", "push_to_hub", check=False, env=bad_env)
    assert failed.returncode != 0
    # one line, printed by the job and echoed from its log (show-failed-logs)
    errors = {line for line in failed.stdout.splitlines() if line.startswith("ERROR: ")}
    assert errors == {
        f"ERROR: the hub at {server.url} rejected the token (HTTP 401 Unauthorized): "
        "set HF_TOKEN or run `hf auth login` with a valid token"
    }, failed.stdout[-3000:]
    assert BAD_TOKEN not in failed.stdout and files_containing(workdir, BAD_TOKEN) == []
    assert not (workdir / "results/demo/hub/upload.json").exists()

    done = run(workdir, "--cores", "2", "upload", env=published.env)
    assert "push_to_hub" in done.stdout
    record = json.loads((workdir / "results/demo/hub/upload.json").read_text())
    assert len(server.repos[REPO].commits) == 1
    assert record["commit"] == first["commit"] and not record["new_commit"]
    assert TOKEN not in done.stdout and files_containing(workdir, TOKEN) == []
