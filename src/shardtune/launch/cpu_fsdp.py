"""Keep FSDP on CPU-only machines.

Accelerate treats `distributed_type: FSDP` + `use_cpu: true` as plain multi-CPU data
parallel and drops the FSDP plugin, so checkpoints come out unsharded. PyTorch's FSDP2
works on CPU with gloo, so on a machine without GPUs we keep the plugin. This is the only
place that touches Accelerate internals; `tests/test_cpu_fsdp.py` fails loudly if an
Accelerate upgrade breaks it.
"""

import functools
import os

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_PATCHED = "_shardtune_keeps_fsdp_on_cpu"


def keep_fsdp_on_cpu():
    """Patch AcceleratorState once; a no-op where CUDA is available."""
    if torch.cuda.is_available() or getattr(AcceleratorState.__init__, _PATCHED, False):
        return
    original = AcceleratorState.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if plugin is not None and wants_fsdp and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            # MULTI_CPU sets the device to `cpu:0`; FSDP1 compares the `device_id` Accelerate
            # passes with the current device (`cpu`) and refuses the mismatch.
            self.device = PartialState._shared_state["device"] = torch.device("cpu")

    setattr(__init__, _PATCHED, True)
    AcceleratorState.__init__ = __init__
