"""shardtune's training entry point (`-m shardtune.train`) with the bench hooks: a step timer
added to the trainer's callbacks and, on request, a proposed fix applied on top.

    accelerate launch --config_file X.yaml bench/_ours.py --timer T.json [--fix flattened-batches] \
        -- <shardtune.train arguments>

Everything else is shardtune.train.entry.main unchanged.
"""

import argparse
import sys

import shardtune.train.entry as train  # applies the CPU FSDP shim before Accelerate's state exists

from benchlib import step_timer


def add_callback(callback, first=False):
    """Give every trainer that shardtune.train builds one more callback (first or last)."""
    base = train.Trainer

    class PatchedTrainer(base):
        def __init__(self, *args, callbacks=None, **kwargs):
            callbacks = list(callbacks or [])
            super().__init__(*args, callbacks=[callback, *callbacks] if first else [*callbacks, callback], **kwargs)

    train.Trainer = PatchedTrainer


def add_timer(path, reset_peak):
    add_callback(step_timer(path, reset_peak))


def flattened_batches():
    """shardtune before per-row batches: a batch of packed rows flattened into one
    [1, batch * max_seq_len] padding-free sequence (TRL's collator), on every attention
    kernel, for comparison with today's [batch, max_seq_len] rows on sdpa/eager."""
    original = train.sft_config

    def sft_config(settings, output_dir, attn="sdpa"):
        return original(settings, output_dir, "flash_attention_2" if settings["data"]["packing"] else attn)

    train.sft_config = sft_config
    train.flattens_batches = lambda attn: True


def malloc_trim():
    """Proposed fix: give the heap memory freed when FSDP replaced the full weights by their
    shards back to the system (glibc malloc_trim) once the model is wrapped, at train begin."""
    import ctypes

    from transformers import TrainerCallback

    class Trim(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ctypes.CDLL("libc.so.6").malloc_trim(0)

    add_callback(Trim(), first=True)


def mmap_threshold():
    """Proposed fix: a fixed glibc mmap threshold (128 KiB), set before the model is loaded.
    glibc raises its threshold after large blocks are freed, so once FSDP has replaced the
    full weights by their shards, later blocks come from the heap and the freed weights'
    memory stays with the process; a fixed threshold keeps large blocks in their own
    mappings, returned to the system when freed (same as MALLOC_MMAP_THRESHOLD_=131072)."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def mmap_threshold_4m():
    """A fixed 4 MiB mmap threshold: the per-parameter blocks FSDP gathers and frees (a layer's
    weight matrices) get their own mappings, smaller tensors (most activations) the heap."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 4 * 1024 * 1024)


def mmap_threshold_while_loading():
    """Proposed fix: the fixed 128 KiB mmap threshold while the model is loaded, wrapped and
    through the first optimizer step (FSDP2's lazy initialisation in the first forward copies
    every local shard once more), so that the memory FSDP frees goes back to the system; then
    32 MiB, glibc's own ceiling, so that later steps reuse heap memory as they do today instead
    of mapping and zeroing fresh pages for every large tensor."""
    import ctypes

    from transformers import TrainerCallback

    M_MMAP_THRESHOLD = -3
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)

    class Raise(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1 or not getattr(self, "raised", True):
                libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)
            self.raised = True

        def on_train_begin(self, args, state, control, **kwargs):
            self.raised = False

    add_callback(Raise(), first=True)


def release_weight_pages():
    """Proposed fix: once FSDP has copied a module's shard of its weights, drop the pages of the
    memory-mapped safetensors file those weights were read from out of this process (madvise
    MADV_DONTNEED: the pages stay in the page cache, shared, and are read back from the file if
    touched again), so that while the rest of the model is wrapped a rank does not hold both its
    shards and the file pages it read them from. Only pages of the *.safetensors mappings under
    the module's original parameters are touched (torch maps the file private and writable:
    pages written since loading would be lost, which is safe only because FSDP has replaced
    those parameters by their copied shards)."""
    import ctypes
    import mmap

    import torch.distributed.fsdp as fsdp
    from torch.distributed.tensor import DTensor

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    MADV_DONTNEED, page = 4, mmap.PAGESIZE

    def weight_file_ranges():
        ranges = []
        for line in open("/proc/self/maps"):
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith(".safetensors"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
        return ranges

    original = fsdp.fully_shard

    def fully_shard(module, *args, **kwargs):
        modules = module if isinstance(module, (list, tuple)) else [module]
        storages = {
            (p.untyped_storage().data_ptr(), p.untyped_storage().nbytes())
            for m in modules
            for p in m.parameters()
            if not isinstance(p, DTensor)  # already sharded by an inner call
        }
        result = original(module, *args, **kwargs)
        files = weight_file_ranges()
        for ptr, size in storages:
            start, end = -(-ptr // page) * page, (ptr + size) // page * page  # whole pages inside
            for low, high in files:
                lo, hi = max(start, low), min(end, high)
                if hi > lo:
                    libc.madvise(lo, hi - lo, MADV_DONTNEED)
        return result

    fsdp.fully_shard = fully_shard


def every_rank_reads():
    """shardtune before ranks other than 0 built the model on the meta device: with
    cpu_ram_efficient_loading every rank read the whole checkpoint (transformers' loading)."""
    train.receives_weights = lambda settings, rank: False


FIXES = {
    "every-rank-reads": every_rank_reads,
    "flattened-batches": flattened_batches,
    "release-weight-pages": release_weight_pages,
    "malloc-trim": malloc_trim,
    "mmap-threshold": mmap_threshold,
    "mmap-threshold-while-loading": mmap_threshold_while_loading,
    "mmap-threshold-4m": mmap_threshold_4m,
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timer", required=True, help="JSON file for the step times (one per rank)")
    parser.add_argument("--fix", choices=sorted(FIXES), action="append", default=[], help="apply a proposed fix")
    parser.add_argument("--reset-peak", action="store_true", help="count peak RSS from the start of training")
    args = parser.parse_args(argv[:split])
    for fix in args.fix:
        FIXES[fix]()
    add_timer(args.timer, args.reset_peak)
    train.main(argv[split + 1 :])


if __name__ == "__main__":
    main()
