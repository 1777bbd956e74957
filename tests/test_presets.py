"""The two 70B presets reproduce the source recipe: its Accelerate configs key for key and
every flag of its launch commands."""

import shlex
from pathlib import Path

import pytest
import yaml

from shardtune.config import deep_merge, resolve_runs
from shardtune.launch import accelerate_config
from recipe_flags import recipe_flags

REPO = Path(__file__).resolve().parents[1]
RECIPE = Path(__file__).parent / "recipe"
PRESETS = [
    ("llama2-70b-lora-fsdp", "fsdp_config.yaml", "run_peft_fsdp.sh", 8),
    ("llama2-70b-qlora-fsdp", "fsdp_config_qlora.yaml", "run_peft_qlora_fsdp.sh", 2),
]


def preset_run(name):
    """The preset given with --configfile over config.yaml, as the workflow resolves it."""
    default = yaml.safe_load((REPO / "config.yaml").read_text())
    preset = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    merged = deep_merge(default, preset)
    merged["runs"] = preset["runs"]  # a config file's runs replace the default's
    (run, settings), = resolve_runs(merged).items()
    return run, settings


def launch_flags(script):
    """{flag: value} of the recipe's launch command; a bare flag (--push_to_hub) is True."""
    words = shlex.split((RECIPE / script).read_text())
    words = words[words.index("train.py") + 1 :]
    flags, i = {}, 0
    while i < len(words):
        name = words[i][2:]
        if i + 1 < len(words) and not words[i + 1].startswith("--"):
            flags[name], i = words[i + 1], i + 2
        else:
            flags[name], i = True, i + 1
    return flags


def same(ours, theirs):
    if isinstance(theirs, bool) or theirs in ("True", "False"):
        return bool(ours) == (theirs in (True, "True"))
    if isinstance(ours, bool):
        return False
    if isinstance(ours, (int, float)):
        return float(ours) == float(theirs)
    return str(ours) == str(theirs)


@pytest.mark.parametrize("preset, accel, _script, gpus", PRESETS)
def test_preset_renders_the_recipes_accelerate_config_key_for_key(preset, accel, _script, gpus):
    _, settings = preset_run(preset)
    ours = accelerate_config.build(settings, gpus=gpus)
    theirs = yaml.safe_load((RECIPE / accel).read_text())
    assert ours == theirs


@pytest.mark.parametrize("preset, _accel, script, _gpus", PRESETS)
def test_preset_maps_back_to_every_flag_of_the_recipes_launch_command(preset, _accel, script, _gpus):
    run, settings = preset_run(preset)
    ours = recipe_flags(run, settings)
    theirs = launch_flags(script)
    # newer versions of the script renamed these two flags
    theirs.pop("config_file", None)
    missing = set(theirs) - set(ours)
    assert not missing, f"recipe flags with no home in the config: {missing}"
    wrong = {k: (ours[k], v) for k, v in theirs.items() if not same(ours[k], v)}
    assert not wrong, f"flags that differ (ours, recipe's): {wrong}"
