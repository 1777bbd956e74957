"""Configuration: JSON-Schema validation with defaults, per-run merging, cross-field checks,
and the content keys that let runs share fetched and prepared inputs."""

import copy
import difflib
import hashlib
import json
from pathlib import Path

import jsonschema
import yaml

from shardtune.errors import UserError
from shardtune.plan.attention import HALF, compute_dtype_name

# package data, so that an installed shardtune validates without the source tree
# (workflow/schemas/config.schema.yaml links here)
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"
SECTIONS = ("dataset", "model", "data", "lora", "quantization", "fsdp", "training", "convert", "merge", "evaluate", "hub", "memory", "resources")


class ConfigError(UserError):
    """A configuration value that cannot work; the message names the key."""


def _with_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(name, copy.deepcopy(sub["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def load_schema(path=SCHEMA_PATH):
    return yaml.safe_load(Path(path).read_text())


def _key_path(prefix, error):
    parts = [*prefix, *map(str, error.absolute_path)]
    if error.validator == "additionalProperties":
        unexpected = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return ".".join(parts + unexpected[:1]) or "<top level>", f"unknown key (allowed: {', '.join(sorted(error.schema.get('properties', {})))})"
    if error.validator == "enum" and len(error.validator_value) > 6:
        # A long list (optimizers, schedules): the closest names first, not all of them.
        close = difflib.get_close_matches(str(error.instance), map(str, error.validator_value), n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        return ".".join(parts), f"{error.instance!r} is not allowed; {hint}(one of {len(error.validator_value)}: see docs/config.md)"
    return ".".join(parts) or "<top level>", error.message


def validate(instance, schema, prefix=()):
    """Fill defaults into `instance` in place; raise ConfigError naming the first bad key."""
    errors = sorted(_Validator(schema).iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        # Prefer the most specific error (deepest path) of the first offending key.
        error = max(errors, key=lambda e: len(e.absolute_path)) if len(errors) > 1 else errors[0]
        key, message = _key_path(prefix, error)
        raise ConfigError(f"config error at '{key}': {message}")
    return instance


def deep_merge(base, override):
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml(path):
    """A YAML config file as a dict; a syntax error names the file, line and column."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}: line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        raise ConfigError(f"config error in {where}: {getattr(err, 'problem', None) or err}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config error in {path}: expected sections (a mapping) at the top level")
    return data or {}


def layered(config, paths):
    """`config` with the runs of layered config files: Snakemake deep-merges config files in
    order, but `runs:` is replaced as a whole by the last file that names it, so that
    `--configfile my.yaml` and `--configfile config.yaml my.yaml` both run exactly my.yaml's
    runs, and a file without `runs:` keeps the earlier file's."""
    runs, source = config.get("runs"), "the config"
    for path in paths:
        if Path(path).is_file():
            data = read_yaml(path)
            if "runs" in data:
                runs, source = data["runs"], path
    if not runs and "runs" in config:
        raise ConfigError(f"config error at 'runs': {source} names no run; name at least one, e.g. runs: {{mine: {{}}}}")
    return {**config, "runs": runs} if runs is not None else config


def resolve_runs(config, schema=None):
    """Validate `config` (filling defaults) and return {run name: fully resolved settings}."""
    schema = schema or load_schema()
    config = validate(copy.deepcopy(config), schema)
    defaults = {name: config[name] for name in SECTIONS}
    run_schema = {**schema, "properties": {k: v for k, v in schema["properties"].items() if k != "runs"}}
    runs = {}
    for name, override in config["runs"].items():
        settings = validate(deep_merge(defaults, override), run_schema, prefix=("runs", name))
        check_combinations(settings, prefix=f"runs.{name}")
        # Canonical key order: Snakemake compares params by their repr, so the order keys
        # were written in must not make a rule look changed.
        runs[name] = json.loads(json.dumps(settings, sort_keys=True))
    return runs


def check_combinations(s, prefix="run"):
    """Reject settings that validate one by one but cannot work together, before any job starts."""
    q, f, t, lora = s["quantization"], s["fsdp"], s["training"], s["lora"]

    def fail(key, message):
        raise ConfigError(f"config error at '{prefix}.{key}': {message}")

    if q["load_in_8bit"]:
        fail("quantization.load_in_8bit", "8-bit quantization cannot be sharded by FSDP; use load_in_4bit (QLoRA)")
    if f["version"] == 2 and f["sharding_strategy"] == "NO_SHARD":
        fail("fsdp.sharding_strategy", "FSDP2 cannot leave parameters unsharded; use FULL_SHARD or SHARD_GRAD_OP")
    if f["version"] == 2 and f["sharding_strategy"] == "HYBRID_SHARD":
        # Accelerate's FSDP2 plugin reads only reshard_after_forward: HYBRID_SHARD would
        # silently become FULL_SHARD across every node
        fail("fsdp.sharding_strategy", "HYBRID_SHARD needs fsdp.version: 1 (FSDP2 would shard across all nodes instead)")
    if f["activation_checkpointing"] and t["gradient_checkpointing"] is True:  # auto resolves to false
        # transformers refuses gradient checkpointing on a model whose layers FSDP already
        # checkpoints, after the model has loaded
        fail(
            "fsdp.activation_checkpointing",
            "checkpoints the same activations as training.gradient_checkpointing; set training.gradient_checkpointing: false to use it",
        )
    if f["version"] == 2 and f["forward_prefetch"]:
        fail("fsdp.forward_prefetch", "FSDP2 has no forward prefetch option; set it false or use fsdp.version: 1")
    if q["load_in_4bit"]:
        if f["mixed_precision"] == "fp16" and q["bnb_4bit_quant_storage_dtype"] != "float32":
            fail("quantization.bnb_4bit_quant_storage_dtype", "fp16 mixed precision needs float32 quant storage")
        if "paged" in t["optim"] and "8bit" in t["optim"]:
            fail("training.optim", f"{t['optim']} fails to save checkpoints with FSDP + QLoRA; use adamw_torch")
        if s["model"]["dtype"] not in ("auto", q["bnb_4bit_quant_storage_dtype"]):
            fail("model.dtype", "with load_in_4bit the model must load in the quant storage dtype (use auto)")
    compute = compute_dtype_name(s)
    if s["model"]["attn_implementation"] == "flash_attention_2" and compute not in HALF:
        fail(
            "model.attn_implementation",
            f"flash_attention_2 needs bf16 or fp16 compute but this run computes in {compute}; "
            "set training.bf16: true (or fsdp.mixed_precision: bf16) or attn_implementation: auto",
        )
    if f["version"] == 1 and f["use_orig_params"]:
        fail("fsdp.use_orig_params", "with LoRA under FSDP1 use_orig_params must be false to save memory")
    if f["cpu_ram_efficient_loading"] and not f["sync_module_states"] and f["version"] == 1:
        fail("fsdp.sync_module_states", "cpu_ram_efficient_loading under FSDP1 needs sync_module_states: true")
    effective = t["per_device_effective_batch_size"]
    if t["per_device_train_batch_size"] == "auto" and effective is None:
        fail(
            "training.per_device_effective_batch_size",
            "per_device_train_batch_size: auto needs the rows per device per optimizer step to keep "
            "(per_device_train_batch_size x gradient_accumulation_steps, e.g. 32)",
        )
    if t["per_device_train_batch_size"] != "auto" and effective not in (None, t["per_device_train_batch_size"] * t["gradient_accumulation_steps"]):
        fail(
            "training.per_device_effective_batch_size",
            f"is {effective} but per_device_train_batch_size x gradient_accumulation_steps is "
            f"{t['per_device_train_batch_size'] * t['gradient_accumulation_steps']}; set per_device_train_batch_size: auto or leave it out",
        )
    if t["eval_strategy"] == "steps" and t["eval_steps"] is None:
        fail("training.eval_steps", "eval_strategy: steps needs eval_steps")
    if f["machine_rank"] >= f["num_machines"]:
        fail("fsdp.machine_rank", f"must be below num_machines ({f['num_machines']})")
    if f["num_machines"] > 1 and not f["main_process_ip"]:
        fail("fsdp.main_process_ip", "a multi-machine run needs the main process address")
    if lora["use_dora"] and q["load_in_8bit"]:
        fail("lora.use_dora", "DoRA on 8-bit weights is not supported")


def pushed_runs(runs):
    """Names of the runs to publish; a run with hub.push but no repo_id, or two runs sharing a
    repo (they would overwrite each other), is a config error."""
    pushed, owner = [], {}
    for name, settings in runs.items():
        hub = settings["hub"]
        if not hub["push"]:
            continue
        repo = hub["repo_id"]
        if not repo:
            raise ConfigError(f"config error at 'runs.{name}.hub.repo_id': hub.push is true but no repo_id is set")
        if repo in owner:
            raise ConfigError(
                f"config error at 'runs.{name}.hub.repo_id': {repo} is also the repo of run '{owner[repo]}';"
                " give each run its own repo"
            )
        owner[repo] = name
        pushed.append(name)
    return pushed


def check_local_sources(runs):
    """Local data set and model paths exist (a model directory with its config.json), and a
    chat template is a known format or a file: checked when the DAG is built rather than by
    the first job that reads them."""
    for name, s in runs.items():
        data, model = s["dataset"]["source"], s["model"]["source"]
        if data != "builtin" and not data.startswith("hf:") and not Path(data).exists():
            raise ConfigError(f"config error at 'runs.{name}.dataset.source': {data} does not exist")
        if model != "builtin" and not model.startswith("hf:"):
            if not Path(model).is_dir():
                raise ConfigError(f"config error at 'runs.{name}.model.source': {model} is not a directory")
            if not (Path(model) / "config.json").is_file():
                raise ConfigError(f"config error at 'runs.{name}.model.source': {model} is not a model directory (no config.json)")
        template = s["data"]["chat_template_format"]
        if template not in ("chatml", "zephyr", "tokenizer") and not Path(template).is_file():
            raise ConfigError(
                f"config error at 'runs.{name}.data.chat_template_format': {template!r} is neither chatml, zephyr, "
                "tokenizer (the model's own) nor a template file"
            )


def check_hub_token(pushed):
    """Publishing is on for the runs `pushed`: a Hub token must be there (HF_TOKEN or the login
    cache), or the upload would fail after training, conversion and evaluation."""
    from huggingface_hub import get_token

    if pushed and not get_token():
        raise ConfigError(
            f"config error at 'runs.{pushed[0]}.hub.push': publishing is on but no Hugging Face token was found; "
            "set HF_TOKEN or run `hf auth login` (or set hub.push: false)"
        )


def content_key(label, *parts):
    """A short, readable key: '<label>-<hash of parts>'."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]
    safe = "".join(c if c.isalnum() else "_" for c in label.split(":")[-1].split("/")[-1])[:40]
    return f"{safe}-{digest}"


def dataset_key(s):
    return content_key(s["dataset"]["source"], s["dataset"])


def model_key(s):
    return content_key(s["model"]["source"], {k: s["model"][k] for k in ("source", "revision", "builtin")})


def prepared_key(s):
    return content_key(s["dataset"]["source"], dataset_key(s), model_key(s), s["data"])
