"""PEFT adapter state under FSDP1's nested wrapping.

PEFT (0.21) finds the adapter's state-dict keys from `model.named_modules()` and strips one
leading `_fsdp_wrapped_module.` from each name. Under FSDP1 with a per-layer wrap policy (the
recipe's TRANSFORMER_BASED_WRAP) every decoder layer is wrapped again, so the names keep a
`_fsdp_wrapped_module.` in the middle while FSDP's state dict has clean names: nothing
matches, and every checkpoint holds an empty adapter (resuming then restores nothing). Here
the names are cleaned the way FSDP cleans its own state-dict keys. FSDP2 wraps in place and
is not affected. `tests/test_cpu_fsdp.py` checks both the bug and this fix against the
installed PEFT.
"""

import functools

from peft.tuners import tuners_utils
from torch.distributed.fsdp._common_utils import clean_tensor_name

_PATCHED = "_shardtune_cleans_fsdp1_names"


def clean_adapter_prefixes():
    """Patch PEFT once so that adapter key prefixes carry no FSDP1 / checkpoint wrapper names."""
    original = tuners_utils._get_tuner_state_dict_key_prefixes
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def prefixes(model, adapter_name=None):
        return {clean_tensor_name(prefix) for prefix in original(model, adapter_name)}

    setattr(prefixes, _PATCHED, True)
    # PEFT looks the function up in its module at each call
    tuners_utils._get_tuner_state_dict_key_prefixes = prefixes
