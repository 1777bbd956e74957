"""The C allocator of the training processes (`training.allocator`).

On CPU ranks the weights and FSDP's per-layer gathers live in host memory: every step gathers
each layer's weights and frees them again, between smaller blocks that stay alive. glibc's
malloc keeps most of that freed memory in a fragmented heap that grows from step to step, so
a rank's resident set grows well past its live tensors. tcmalloc reuses that memory instead
(a rank holds less, and touches fewer fresh pages than with glibc), so the launcher preloads
it (LD_PRELOAD) into `accelerate launch` and, through it, into every rank. jemalloc with a
decay time returns freed memory to the system and so holds the least between steps, but
every step then maps and zeroes those pages again: it costs throughput (BENCHMARKS.md,
figure 3), so it is used only when asked for.

- `auto`: on CPU ranks tcmalloc when its library is found, else the system allocator; on GPU
  nodes (host memory holds little there) the system allocator;
- `tcmalloc`, `jemalloc`: that one when found, else the system allocator (with a warning);
- `system`: the C library's malloc, nothing preloaded.

The choice and the reason are logged by the launcher; training logs the allocator it really
runs with (`loaded()`, from /proc/self/maps).
"""

import os
import sys
from pathlib import Path

CHOICES = ("auto", "jemalloc", "tcmalloc", "system")
PREFERENCE = ("tcmalloc",)  # what auto tries, in order

# Library file names, most specific first (Debian/Ubuntu packages libtcmalloc-minimal4 or
# google-perftools, and libjemalloc2).
LIBRARIES = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
}

# Settings read by each allocator at start-up; a value already in the environment wins.
SETTINGS = {
    # Freed pages go back to the system from a background thread within about a second
    # (the least memory held between steps, at the cost of refaulting them in the next one).
    "jemalloc": {"MALLOC_CONF": "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"},
    "tcmalloc": {},  # its defaults: freed memory is reused, and released to the system slowly
}

INSTALL = {
    "jemalloc": "apt-get install libjemalloc2",
    "tcmalloc": "apt-get install libtcmalloc-minimal4",
}


def search_dirs(env):
    """Where the libraries are looked for: LD_LIBRARY_PATH, the Python environment's lib
    (a conda environment's own jemalloc), then the system's library directories."""
    dirs = [d for d in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    for prefix in (env.get("CONDA_PREFIX"), sys.prefix):
        if prefix:
            dirs.append(os.path.join(prefix, "lib"))
    machine = os.uname().machine
    for root in ("/usr/local/lib", "/usr/lib", "/lib"):
        dirs += [f"{root}/{machine}-linux-gnu", root]
    dirs += ["/usr/lib64", "/lib64"]
    return list(dict.fromkeys(dirs))


def find_library(name, env=None):
    """The path of allocator `name`'s shared library, or None."""
    env = os.environ if env is None else env
    for directory in search_dirs(env):
        for filename in LIBRARIES[name]:
            path = Path(directory) / filename
            if path.is_file():
                return str(path)
    return None


def preloaded(env):
    """The allocator already named in LD_PRELOAD, if any."""
    for entry in env.get("LD_PRELOAD", "").replace(":", " ").split():
        for name in LIBRARIES:
            if Path(entry).name.startswith(f"lib{name}"):
                return name
    return None


def select(requested, env=None, gpus=0, find=None):
    """(allocator, environment updates, reason) for `training.allocator: requested` on a node
    whose ranks use `gpus` GPUs (0: CPU ranks).

    `find(name, env)` returns a library path or None (tests pass their own). The updates are
    what the training processes' environment needs: LD_PRELOAD and the allocator's settings."""
    env = os.environ if env is None else env
    find = find or find_library
    if requested not in CHOICES:
        raise ValueError(f"unknown allocator {requested!r} (choose from {', '.join(CHOICES)})")
    already = preloaded(env)
    if already:
        return already, {}, f"the environment's LD_PRELOAD has it ({env['LD_PRELOAD']})"
    if requested == "system":
        return "system", {}, "training.allocator: system"
    if requested == "auto" and gpus:
        return "system", {}, "training.allocator: auto, and the ranks train on GPUs"
    candidates = PREFERENCE if requested == "auto" else (requested,)
    for name in candidates:
        path = find(name, env)
        if path:
            updates = {"LD_PRELOAD": " ".join(filter(None, [path, env.get("LD_PRELOAD", "")]))}
            updates.update({k: v for k, v in SETTINGS[name].items() if k not in env})
            return name, updates, f"training.allocator: {requested}, found {path}"
    missing = " or ".join(candidates)
    hint = "; ".join(INSTALL[name] for name in candidates)
    return "system", {}, f"training.allocator: {requested}, but {missing} was not found ({hint}); using the system allocator"


def loaded(maps="/proc/self/maps"):
    """The allocator this process runs with: 'jemalloc' or 'tcmalloc' when its library is
    mapped, else 'system'."""
    try:
        text = Path(maps).read_text()
    except OSError:
        return "unknown"
    for name in LIBRARIES:
        if f"/lib{name}" in text:
            return name
    return "system"
