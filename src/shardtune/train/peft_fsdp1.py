"""PEFT adapter state under FSDP1 (`use_orig_params: false`, the recipe's setting): two PEFT
(0.21) name mismatches that each silently lose the adapter, fixed where they arise.

Saving: PEFT finds the adapter's state-dict keys from `model.named_modules()` and strips one
leading `_fsdp_wrapped_module.` from each name. With a per-layer wrap policy (the recipe's
TRANSFORMER_BASED_WRAP) every decoder layer is wrapped again, so the names keep a
`_fsdp_wrapped_module.` in the middle while FSDP's state dict has clean names: nothing
matches, and every checkpoint holds an empty adapter.

Loading (resume): PEFT decides whether the keys keep their `base_model.model.` prefix from
`model.named_parameters()`, which under FSDP1 are flat parameters named `..._flat_param`: it
strips the prefix, no key matches, `load_state_dict(strict=False)` ignores them all, and a
resumed run goes on from an untrained adapter at the checkpoint's step.

FSDP2 wraps in place and keeps parameter names; it is not affected. `tests/test_cpu_fsdp.py`
checks both bugs and both fixes against the installed PEFT on two ranks.
"""

import functools

import peft
from peft.tuners import tuners_utils
from peft.utils import save_and_load
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp._common_utils import clean_tensor_name

_PATCHED = "_shardtune_fsdp1_names"
PREFIX = "base_model.model."


def fix_peft_under_fsdp1():
    """Patch PEFT once, for saving and for loading adapter state under FSDP1."""
    original = tuners_utils._get_tuner_state_dict_key_prefixes
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def prefixes(model, adapter_name=None):
        return {clean_tensor_name(prefix) for prefix in original(model, adapter_name)}

    setattr(prefixes, _PATCHED, True)
    # PEFT looks the function up in its module at each call
    tuners_utils._get_tuner_state_dict_key_prefixes = prefixes

    matched = save_and_load._find_mismatched_keys

    @functools.wraps(matched)
    def with_prefix(model, state_dict, *args, **kwargs):
        # called right after PEFT stripped the prefix: put it back where the FSDP1 root wraps a PeftModel
        if (
            isinstance(model, FullyShardedDataParallel)
            and isinstance(model.module, peft.PeftModel)
            and not any(name.startswith(PREFIX) for name, _ in model.named_parameters())
        ):
            state_dict = {key if key.startswith(PREFIX) else PREFIX + key: value for key, value in state_dict.items()}
        return matched(model, state_dict, *args, **kwargs)

    save_and_load._find_mismatched_keys = with_prefix
