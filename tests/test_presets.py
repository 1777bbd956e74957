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


# Where training deliberately passes SFTConfig something else than the recipe's train.py, and
# why; every other field the recipe's flags set must come out equal.
INTENDED = {
    "output_dir": "results/<run>/train, not the recipe's working-directory name",
    "push_to_hub": "the workflow publishes in its own step (push_to_hub) or callback (every_save)",
    "hub_strategy": "as push_to_hub: the Trainer's own push would upload sharded FSDP state",
    "hub_private_repo": "as push_to_hub (hub.private is used by the publish step)",
    "packing": "rows arrive packed by prepare_data; TRL packs again only for flash attention's padding-free batches",
    "dataset_text_field": "rows arrive tokenized (dataset_kwargs.skip_prepare_dataset)",
}


def recipe_sft_config(script, tmp_path):
    """SFTConfig as the recipe's train.py gets it: its flags through TRL's own argument parser
    (HfArgumentParser), with the two flags newer versions renamed."""
    from transformers import HfArgumentParser
    from trl import SFTConfig

    words = shlex.split((RECIPE / script).read_text())
    words = words[words.index("train.py") + 1 :]
    renamed = {"--evaluation_strategy": "--eval_strategy", "--max_seq_len": "--max_length"}
    words = [renamed.get(w, w) for w in words]
    import torch

    if not torch.cuda.is_available():  # bf16 on CPU is refused without it; training sets it too
        words += ["--use_cpu", "True"]
    config, rest = HfArgumentParser(SFTConfig).parse_args_into_dataclasses(args=words, return_remaining_strings=True)
    use_reentrant = rest[rest.index("--use_reentrant") + 1] == "True"
    config.gradient_checkpointing_kwargs = {"use_reentrant": use_reentrant}  # as train.py sets it
    return config, words


@pytest.mark.parametrize("preset, _accel, script, _gpus", PRESETS)
def test_training_passes_the_trainer_what_the_recipes_train_py_passes(preset, _accel, script, _gpus, tmp_path):
    from shardtune.train.entry import sft_config

    run, settings = preset_run(preset)
    theirs, words = recipe_sft_config(script, tmp_path)
    ours = sft_config(settings, tmp_path / "train", attn="flash_attention_2")
    set_by_recipe = {w[2:] for w in words if w.startswith("--")} & set(vars(theirs))
    assert len(set_by_recipe) >= 20, set_by_recipe  # the parser really read the recipe's flags
    differ = {k: (getattr(ours, k), getattr(theirs, k)) for k in sorted(set_by_recipe | {"gradient_checkpointing_kwargs"})
              if getattr(ours, k) != getattr(theirs, k)}
    unexplained = {k: v for k, v in differ.items() if k not in INTENDED}
    assert not unexplained, f"trainer arguments that differ from the recipe's (ours, recipe's): {unexplained}"


def test_training_builds_the_recipes_lora_config():
    """train.py's LoraConfig(r, lora_alpha, lora_dropout, target_modules, bias='none', CAUSAL_LM)."""
    from peft import LoraConfig

    from shardtune.train.entry import lora_config

    for preset, _, script, _ in PRESETS:
        flags = launch_flags(script)
        theirs = LoraConfig(
            r=int(flags["lora_r"]),
            lora_alpha=int(flags["lora_alpha"]),
            lora_dropout=float(flags["lora_dropout"]),
            target_modules=flags["lora_target_modules"],
            bias="none",
            task_type="CAUSAL_LM",
        )
        ours = lora_config(preset_run(preset)[1]["lora"])
        for field in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type", "use_dora"):
            assert getattr(ours, field) == getattr(theirs, field), (preset, field)
