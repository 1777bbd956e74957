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
acc = Accelerator(cpu=True)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
model, _ = acc.prepare(model, torch.optim.AdamW(model.parameters()))
weight = acc.unwrap_model(model)[0].weight
local = weight.to_local().shape[0] if hasattr(weight, "to_local") else weight.shape[0]
print(f"rank {acc.process_index}: {acc.distributed_type} local_rows={local}", flush=True)
"""


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu_fsdp")
    config = tmp / "accelerate.yaml"
    settings = resolve_runs({"fsdp": {"auto_wrap_policy": "NO_WRAP"}})["demo"]
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
        return sorted(re.findall(r"rank \d+: \S+ local_rows=\d+", result.stdout))

    return run


def test_with_the_shim_the_model_is_sharded_across_two_ranks(launch):
    assert launch("shim") == [
        "rank 0: DistributedType.FSDP local_rows=32",
        "rank 1: DistributedType.FSDP local_rows=32",
    ]


def test_without_the_shim_accelerate_falls_back_to_unsharded_multi_cpu(launch):
    # If this starts failing, Accelerate handles FSDP on CPU itself: drop the shim.
    assert launch("plain") == [
        "rank 0: DistributedType.MULTI_CPU local_rows=64",
        "rank 1: DistributedType.MULTI_CPU local_rows=64",
    ]
