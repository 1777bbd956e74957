"""Sharded FSDP checkpoint -> PEFT adapter directory, proven to load and to reproduce the
trained model's logits.

Which checkpoint: `convert.checkpoint` is `last` (what done.json names), `best` (lowest
eval_loss among the complete checkpoints, from the Trainer's log_history) or a step number.
"""

import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoTokenizer

from shardtune.errors import UserError
from shardtune.inputs.modeling import DTYPES, load_base_model, load_dtype
from shardtune.inputs.sources import model_path
from shardtune.io import atomic_dir, read_json, write_json
from shardtune.train.checkpoints import checkpoints, is_complete

# How close the reloaded adapter's logits must be to the trained model's, by the least
# precise dtype training computed in: half precision rounds differently between the sharded
# training forward and a single-process reload.
TOLERANCE = {"no": 1e-5, "bf16": 5e-2, "fp16": 1e-2}
PRECISION = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}


def tolerance_of(mixed_precision, settings):
    """From the run's mixed precision, the dtype the base loaded in, and for QLoRA the 4-bit
    compute dtype."""
    dtypes = [load_dtype(settings)]
    if settings["quantization"]["load_in_4bit"]:
        dtypes.append(DTYPES[settings["quantization"]["bnb_4bit_compute_dtype"]])
    return max([TOLERANCE[mixed_precision]] + [TOLERANCE[PRECISION.get(d, "no")] for d in dtypes])


class ConversionError(UserError):
    pass


def _step(path):
    return int(Path(path).name.rsplit("-", 1)[1])


def eval_losses(train_dir):
    """{step: eval_loss} of every evaluation logged so far (the last checkpoint's log_history
    holds all of them)."""
    complete = [p for p in checkpoints(train_dir) if is_complete(p)]
    if not complete:
        return {}
    history = read_json(complete[-1] / "trainer_state.json")["log_history"]
    return {entry["step"]: entry["eval_loss"] for entry in history if "eval_loss" in entry}


def select_checkpoint(train_dir, last, choice):
    """(checkpoint dir, why) for `choice`: 'last', 'best' or a step number."""
    complete = {_step(p): p for p in checkpoints(train_dir) if is_complete(p)}
    if choice == "last":
        return Path(train_dir) / Path(last).name, "the last checkpoint"  # done.json names it relative to train_dir
    if choice == "best":
        losses = eval_losses(train_dir)
        scored = {step: losses[step] for step in complete if step in losses}
        if not scored:
            raise ConversionError(
                f"convert.checkpoint: best: no complete checkpoint in {train_dir} has an eval_loss logged at its step "
                f"(evaluated at steps {sorted(losses) or 'none'}, saved at {sorted(complete)}); evaluate where you "
                "save (training.eval_strategy: steps with eval_steps equal to save_steps, or both per epoch)"
            )
        step = min(scored, key=lambda s: (scored[s], -s))
        return complete[step], f"the best checkpoint by eval_loss ({scored[step]:.6g} at step {step})"
    if choice not in complete:
        raise ConversionError(
            f"convert.checkpoint: {choice}: no complete checkpoint-{choice} in {train_dir} (have {sorted(complete)})"
        )
    return complete[choice], f"checkpoint {choice}, as configured"


def adapter_state(checkpoint):
    """The adapter weights of a sharded checkpoint, with PEFT's key names (the checkpoint holds
    what PEFT's get_peft_model_state_dict returns: LoRA/DoRA weights, modules_to_save, and the
    embedding matrices when the vocabulary was resized). Read in this process alone, so it also
    works from a rank-0 callback (accelerate's merge_fsdp_weights waits for every rank)."""
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(Path(checkpoint) / "pytorch_model_fsdp_0"), f"{tmp}/state.pt")
        state = torch.load(f"{tmp}/state.pt", weights_only=True)
    if len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))
    # PEFT saves adapter weights without the adapter name ("default").
    return {key.replace(".default.", "."): tensor.contiguous() for key, tensor in state.items()}


def embedding_rows(state):
    """Rows of the embedding matrix the adapter carries (None when it carries none)."""
    rows = [t.shape[0] for k, t in state.items() if "embed_tokens" in k and t.dim() == 2 and "lora" not in k]
    return max(rows) if rows else None


def pad_tokenizer(tokenizer, size):
    """Reserve unused special tokens so that len(tokenizer) equals the embedding rows training
    padded to (pad_to_multiple_of=8). AutoPeftModelForCausalLM resizes the base to
    len(tokenizer) before loading; without this, the saved embeddings would not fit."""
    added, i = [], 0
    while len(tokenizer) + len(added) < size:
        name = f"<|reserved_{i}|>"
        if name not in tokenizer.get_vocab():
            added.append(name)
        i += 1
    if added:
        tokenizer.add_tokens(added, special_tokens=True)
    return added


@torch.no_grad()
def _logits(model, probe):
    return model(input_ids=probe["input_ids"], position_ids=probe["position_ids"], use_cache=False).logits.float()


def checkpoint_logits(model_dir, settings, lora_config, state, probe, vocab_size):
    """Logits of the model as resuming training would restore it (the checkpoint's state set
    into a fresh PEFT model), for checkpoints that have no probe of their own."""
    model = get_peft_model(load_base_model(model_dir, settings, vocab_size), lora_config).eval()
    result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise ConversionError(f"checkpoint keys the model does not have: {result.unexpected_keys[:5]}")
    return _logits(model, probe)


def reloaded(model_dir, adapter_dir, settings, vocab_size):
    base = load_base_model(model_dir, settings, vocab_size)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def missing_adapter_tensors(model, state):
    """Adapter tensors the PEFT model has that the checkpoint lacks (an adapter saved from
    wrongly named modules is empty, and loading it only warns)."""
    expected = get_peft_model_state_dict(model, save_embedding_layers=False)
    return sorted(set(expected) - set(state))


def compare_logits(model, probe, mixed_precision):
    """(max abs difference to the probe, tolerance, rounding noise or None).

    Under half-precision training the probe was computed under autocast: the reload is
    compared in the same precision, and the tolerance is measured, not assumed: 3x this
    model's own rounding noise on the probe (autocast against fp32 logits), which bounds two
    half-precision computations of the same function (the training's ranks and this
    process) while the adapter's effect is far larger. In fp32 the reload must match to 1e-5."""
    fp32 = _logits(model, probe)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if half is None:
        return float((fp32 - probe["logits"]).abs().max()), None, None
    with torch.autocast("cpu", dtype=half):
        rounded = _logits(model, probe)
    noise = float((rounded - fp32).abs().max())
    return float((rounded - probe["logits"]).abs().max()), max(3 * noise, TOLERANCE["no"]), noise


def convert(train_done, model_dir, data_dir, settings, out_dir, log=print):
    done = read_json(train_done)
    train_dir = Path(train_done).parent
    checkpoint, why = select_checkpoint(train_dir, done["checkpoint"], settings["convert"]["checkpoint"])
    step = _step(checkpoint)
    log(f"converting {checkpoint} (step {step}): {why}")
    state = adapter_state(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(Path(data_dir) / "tokenizer")
    reserved = pad_tokenizer(tokenizer, embedding_rows(state) or 0)
    if reserved:
        log(f"tokenizer: {len(reserved)} reserved tokens pad it to the {len(tokenizer)} embedding rows")
    probe = load_file(str(train_dir / "probe.safetensors"))
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = read_json(train_dir / "adapter_config" / "adapter_config.json")
        source = settings["model"]["source"]
        config["base_model_name_or_path"] = source[3:] if source.startswith("hf:") else model_path(model_dir)
        config["revision"] = settings["model"]["revision"]
        write_json(tmp / "adapter_config.json", config)
        tokenizer.save_pretrained(tmp)

        model = reloaded(model_dir, tmp, settings, len(tokenizer))
        missing = missing_adapter_tensors(model, state)
        if missing:
            raise ConversionError(
                f"{checkpoint} lacks {len(missing)} of the adapter's tensors (e.g. {missing[0]}): "
                "the training saved an incomplete adapter"
            )
        noise = None
        if step == done["global_step"]:
            # The probe holds the trained model's own logits at the end of training.
            against = "the trained model (probe logits written by training)"
            diff, tolerance, noise = compare_logits(model, probe, done["mixed_precision"])
            tolerance = tolerance or tolerance_of(done["mixed_precision"], settings)
        else:
            lora = LoraConfig.from_pretrained(train_dir / "adapter_config")
            reference = checkpoint_logits(model_dir, settings, lora, state, probe, len(tokenizer))
            against, tolerance = f"checkpoint {step} restored as for resuming", TOLERANCE["no"]
            diff = float((_logits(model, probe) - reference).abs().max())
        del model
        rounding = f", {done['mixed_precision']} rounding noise {noise:.3g}" if noise is not None else ""
        log(f"max abs logit difference vs {against}: {diff:.3g} (tolerance {tolerance:g}{rounding})")
        if not diff <= tolerance:
            raise ConversionError(
                f"the converted adapter does not reproduce {against}: max abs logit diff {diff:.3g} > {tolerance:g}"
            )
        write_json(
            tmp / "conversion.json",
            {
                "checkpoint": checkpoint.name,  # in the training directory
                "selected": settings["convert"]["checkpoint"],
                "why": why,
                "global_step": step,
                "last_step": done["global_step"],
                "eval_loss": eval_losses(train_dir).get(step),
                "tensors": len(state),
                "reserved_tokens": reserved,
                "verified_against": against,
                "max_abs_logit_diff": diff,
                "tolerance": tolerance,
                "rounding_noise": noise,  # half-precision training: what the tolerance is measured from
            },
        )
