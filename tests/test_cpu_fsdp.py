"""The CPU FSDP shim: without it Accelerate silently drops FSDP on CPU; with it the model is
really sharded (FSDP2 DTensor parameters, one shard per rank). If an Accelerate upgrade
changes either behaviour, these tests fail loudly."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from shardtune.config import resolve_runs
from shardtune.launch import accelerate_config

BIN = Path(sys.executable).parent

PROBE = """
import sys, torch
if sys.argv[1] == "shim":
    from shardtune.launch.cpu_fsdp import keep_fsdp_on_cpu
    keep_fsdp_on_cpu()
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
torch.manual_seed(0)
model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules="all-linear"))
acc = Accelerator(cpu=True)
model, optimizer = acc.prepare(model, torch.optim.AdamW(p for p in model.parameters() if p.requires_grad))
inner = acc.unwrap_model(model)
from torch.distributed.fsdp import FSDPModule
wrapped = sorted(type(m).__name__ for m in inner.modules() if isinstance(m, FSDPModule))
def rows(param):
    return param.to_local().shape[0] if hasattr(param, "to_local") else param.shape[0]
layer = inner.base_model.model.model.layers[0].self_attn.q_proj
loss = model(input_ids=torch.randint(0, 256, (2, 16)), labels=torch.randint(0, 256, (2, 16))).loss
loss.backward()
optimizer.step()
print(f"rank {acc.process_index}: {acc.distributed_type} wrapped={','.join(wrapped)}"
      f" base_rows={rows(layer.base_layer.weight)} lora_rows={rows(layer.lora_A.default.weight)}", flush=True)
"""


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu_fsdp")
    config = tmp / "accelerate.yaml"
    settings = resolve_runs({})["demo"]  # the default: FSDP2, TRANSFORMER_BASED_WRAP
    accelerate_config.write(settings, config, gpus=0)
    script = tmp / "probe.py"
    script.write_text(PROBE)

    def run(mode):
        result = subprocess.run(
            [str(BIN / "accelerate"), "launch", "--config_file", str(config), str(script), mode],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        # Both ranks share one pipe, and print() may write a line and its newline in two
        # writes, so lines can interleave: find the records, not the lines.
        return sorted(re.findall(r"rank \d+: \S+ wrapped=\S* base_rows=\d+ lora_rows=\d+", result.stdout))

    return run


def test_with_the_shim_a_peft_decoder_is_wrapped_per_layer_and_sharded_across_two_ranks(launch):
    # each decoder layer, the embeddings, the LM head and the root are FSDP units; frozen base
    # and trainable LoRA weights alike hold half their rows on each rank, through a training step
    wrapped = "FSDPEmbedding,FSDPLinear,FSDPLlamaDecoderLayer,FSDPLlamaDecoderLayer,FSDPPeftModel"
    assert launch("shim") == [
        f"rank 0: DistributedType.FSDP wrapped={wrapped} base_rows=32 lora_rows=4",
        f"rank 1: DistributedType.FSDP wrapped={wrapped} base_rows=32 lora_rows=4",
    ]


def test_without_the_shim_accelerate_falls_back_to_unsharded_multi_cpu(launch):
    # If this starts failing, Accelerate handles FSDP on CPU itself: drop the shim.
    assert launch("plain") == [
        "rank 0: DistributedType.MULTI_CPU wrapped= base_rows=64 lora_rows=8",
        "rank 1: DistributedType.MULTI_CPU wrapped= base_rows=64 lora_rows=8",
    ]


# PEFT's adapter state under FSDP1 with use_orig_params false and per-layer wrapping (the
# recipe's settings): what Accelerate saves into and loads from every checkpoint.
PEFT_FSDP1_PROBE = """
import sys, torch
from shardtune.launch.cpu_fsdp import keep_fsdp_on_cpu
keep_fsdp_on_cpu()
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import save_and_load
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.distributed.fsdp import update_fsdp_plugin_peft
from shardtune.train import peft_fsdp1
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
torch.manual_seed(0)
model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules="all-linear"))
acc = Accelerator(cpu=True)
update_fsdp_plugin_peft(model, acc)  # PEFT's wrap policy, as the Trainer sets it
model = acc.prepare(model)
plugin = acc.state.fsdp_plugin
def local(t):
    shards = t.local_shards() if hasattr(t, "local_shards") else None
    return shards[0].tensor if shards else (t if shards is None else None)
def round_trip():
    state = get_peft_model_state_dict(model, adapter_name="default")
    for t in state.values():
        if local(t) is not None:
            local(t).fill_(0.5)
    missed = len(set_peft_model_state_dict(model, state, adapter_name="default").unexpected_keys)
    back = [local(t) for t in get_peft_model_state_dict(model, adapter_name="default").values()]
    return len(state), missed, all(bool((t == 0.5).all()) for t in back if t is not None and t.numel())
with FSDP.state_dict_type(model, plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config):
    saved = len(get_peft_model_state_dict(model, adapter_name="default"))
    stock_find = save_and_load._find_mismatched_keys
    peft_fsdp1.fix_peft_under_fsdp1()
    fixed_find, save_and_load._find_mismatched_keys = save_and_load._find_mismatched_keys, stock_find
    _, stock_missed, stock_loaded = round_trip()  # the fixed save, PEFT's own load
    save_and_load._find_mismatched_keys = fixed_find
    keys, missed, loaded = round_trip()
print(f"rank {acc.process_index}: stock saves {saved} keys; stock load misses {stock_missed} loaded={stock_loaded};"
      f" fixed saves {keys} keys, load misses {missed} loaded={loaded}", flush=True)
"""


def test_peft_adapter_state_under_fsdp1_saves_and_loads_only_with_the_fix(tmp_path):
    settings = resolve_runs({"fsdp": {"version": 1}})["demo"]
    config = tmp_path / "accelerate.yaml"
    accelerate_config.write(settings, config, gpus=0)
    script = tmp_path / "probe.py"
    script.write_text(PEFT_FSDP1_PROBE)
    result = subprocess.run(
        [str(BIN / "accelerate"), "launch", "--config_file", str(config), str(script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = sorted(re.findall(r"rank \d+: stock saves .*?loaded=\w+; fixed saves .*?loaded=\w+", result.stdout))
    # 2 layers x 7 linears x (A, B): stock PEFT saves none of them and loads none back
    assert records == [
        f"rank {r}: stock saves 0 keys; stock load misses 28 loaded=False; fixed saves 28 keys, load misses 0 loaded=True"
        for r in (0, 1)
    ]
