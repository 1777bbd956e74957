"""training.allocator: which C allocator the launcher preloads into the training processes.
The selection is tested with a fake library lookup, so none of this needs jemalloc or
tcmalloc installed; where either is installed, a test checks that a preloaded process
really maps it."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from shardtune.config import load_schema, validate
from shardtune.launch import allocator
from shardtune.launch import launcher as launch

SCHEMA = load_schema()


def finder(*present):
    return lambda name, env: f"/opt/lib/lib{name}.so" if name in present else None


def test_auto_is_the_default():
    assert validate({"training": {}}, SCHEMA)["training"]["allocator"] == "auto"


def test_unknown_allocator_is_a_config_error():
    from shardtune.config import ConfigError, resolve_runs

    with pytest.raises(ConfigError, match="training.allocator"):
        resolve_runs({"runs": {"a": {}}, "training": {"allocator": "mimalloc"}})


def test_auto_on_cpu_preloads_tcmalloc():
    name, updates, why = allocator.select("auto", {}, gpus=0, find=finder("jemalloc", "tcmalloc"))
    assert name == "tcmalloc" and "/opt/lib/libtcmalloc.so" in why
    assert updates == {"LD_PRELOAD": "/opt/lib/libtcmalloc.so"}


def test_auto_without_tcmalloc_keeps_the_system_allocator_and_says_how_to_install_it():
    # jemalloc costs throughput (its decay refaults pages every step): auto does not pick it
    name, updates, why = allocator.select("auto", {}, find=finder("jemalloc"))
    assert (name, updates) == ("system", {})
    assert "tcmalloc was not found" in why and "apt-get install libtcmalloc-minimal4" in why


def test_auto_keeps_the_system_allocator_on_gpu_nodes():
    name, updates, why = allocator.select("auto", {}, gpus=8, find=finder("tcmalloc"))
    assert (name, updates) == ("system", {}) and "GPUs" in why


def test_an_explicit_allocator_is_used_on_gpus_too_and_a_missing_one_falls_back():
    name, updates, _ = allocator.select("jemalloc", {}, gpus=8, find=finder("jemalloc", "tcmalloc"))
    assert name == "jemalloc" and updates["LD_PRELOAD"] == "/opt/lib/libjemalloc.so"
    assert updates["MALLOC_CONF"] == allocator.SETTINGS["jemalloc"]["MALLOC_CONF"]
    name, updates, why = allocator.select("jemalloc", {}, find=finder("tcmalloc"))
    assert (name, updates) == ("system", {}) and "jemalloc was not found" in why


def test_system_preloads_nothing():
    assert allocator.select("system", {}, find=finder("tcmalloc")) == ("system", {}, "training.allocator: system")


def test_the_environment_wins():
    # an LD_PRELOAD that already names an allocator is left alone
    env = {"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}
    assert allocator.select("auto", env, find=finder("tcmalloc"))[:2] == ("tcmalloc", {})
    # other preloads are kept after ours; the user's MALLOC_CONF is not overwritten
    env = {"LD_PRELOAD": "/opt/libother.so", "MALLOC_CONF": "narenas:2"}
    name, updates, _ = allocator.select("jemalloc", env, find=finder("jemalloc"))
    assert updates == {"LD_PRELOAD": "/opt/lib/libjemalloc.so /opt/libother.so"}


def test_libraries_are_found_in_ld_library_path(tmp_path):
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    env = {"LD_LIBRARY_PATH": f"/nonexistent{os.pathsep}{tmp_path}"}
    assert allocator.find_library("jemalloc", env) == str(tmp_path / "libjemalloc.so.2")


def test_loaded_reads_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert allocator.loaded(maps) == "jemalloc"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator.loaded(maps) == "system"
    assert allocator.loaded(tmp_path / "missing") == "unknown"


def test_the_allocator_is_not_part_of_the_checkpoint_fingerprint():
    from shardtune.train.entry import fingerprint

    settings = json.loads(json.dumps(validate({}, SCHEMA)))
    other = json.loads(json.dumps(settings))
    other["training"]["allocator"] = "system"
    assert fingerprint(settings, "data/x") == fingerprint(other, "data/x")
    other["training"]["seed"] += 1
    assert fingerprint(settings, "data/x") != fingerprint(other, "data/x")


# --- the launcher ------------------------------------------------------------------------------


@pytest.fixture
def one_node(tmp_path, monkeypatch):
    config = tmp_path / "accelerate.yaml"
    config.write_text(yaml.safe_dump({"distributed_type": "FSDP", "num_processes": 2, "use_cpu": True}))
    monkeypatch.setattr(launch.tempfile, "tempdir", str(tmp_path))

    def start(training, gpus, present):
        settings = tmp_path / "train_settings.json"
        settings.write_text(json.dumps(validate({"training": training}, SCHEMA)))
        monkeypatch.setattr(launch, "cuda_device_count", lambda: gpus)
        monkeypatch.setattr(allocator, "find_library", finder(*present))
        env = {}
        argv = ["--config-file", str(config), "--gpus-per-node", str(gpus), "--", "-m", "shardtune.train"]
        launch.node_command(launch.parse_args([*argv, "--settings", str(settings)]), env, log=lambda message, console_too=False: print(f"launch: {message}"))
        return env

    return start


def test_launcher_preloads_tcmalloc_for_cpu_ranks_and_says_so(one_node, capsys):
    env = one_node({}, 0, ["tcmalloc", "jemalloc"])
    assert env["LD_PRELOAD"] == "/opt/lib/libtcmalloc.so"
    assert "launch: allocator: tcmalloc (training.allocator: auto, found /opt/lib/libtcmalloc.so)" in capsys.readouterr().out


def test_launcher_without_the_library_runs_the_system_allocator_and_says_why(one_node, capsys):
    env = one_node({}, 0, [])
    assert "LD_PRELOAD" not in env
    assert "launch: allocator: system (training.allocator: auto, but tcmalloc was not found" in capsys.readouterr().out


def test_launcher_leaves_gpu_nodes_alone_unless_asked(one_node):
    assert "LD_PRELOAD" not in one_node({}, 2, ["tcmalloc"])
    env = one_node({"allocator": "jemalloc"}, 2, ["jemalloc"])
    assert env["LD_PRELOAD"] == "/opt/lib/libjemalloc.so" and "MALLOC_CONF" in env


# --- where the libraries are installed -------------------------------------------------------


@pytest.mark.parametrize("name", ["tcmalloc", "jemalloc"])
def test_a_preloaded_process_runs_with_the_allocator(name):
    if allocator.find_library(name) is None:
        pytest.skip(f"lib{name} is not installed")
    _, updates, _ = allocator.select(name, {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})
    code = "from shardtune.launch.allocator import loaded; print(loaded())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **updates}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == name
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LD_PRELOAD": ""}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "system"
