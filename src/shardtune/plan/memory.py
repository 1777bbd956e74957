"""Pre-flight memory estimate of a run: per-device and CPU memory, before a GPU-hour is spent.

Counts come from the real model built on the meta device (no weights are read), so every
architecture transformers knows is covered. Each term below models a mechanism of the stack
shardtune trains with (torch FSDP, Accelerate, transformers, PEFT, TRL, bitsandbytes); where a
term depends on a library's behaviour, its comment says which. In short:

- weights: FSDP keeps 1/W of the base weights in the dtype they load in (float32 unless QLoRA
  or model.dtype says otherwise), gathers one decoder layer at a time in the compute dtype (two
  with prefetch), and keeps the root unit (embeddings, final norm, LM head) gathered from forward
  to backward; QLoRA's quantization constants stay whole on every GPU, and each 4-bit matmul
  dequantizes its weight to the compute dtype for the duration of the product;
- LoRA weights, gradients and Adam moments: 1/W each, in the adapters' dtype;
- activations: what autograd keeps per decoder layer, counted tensor by tensor (RMSNorm's fp32
  input, the attention kernel's q/k/v/output, the MLP's gate/up/SiLU outputs, each LoRA target's
  dropout copy and mask), plus eager attention's probabilities (rows x heads x L^2: sdpa and
  eager batches are [batch, L] rows, flash-attention batches one flattened sequence);
  with gradient checkpointing one hidden state per layer plus the layer being recomputed;
  the peak adds the larger of one layer's backward working set and the loss (TRL's fused LM
  head, which never materializes the full logits);
- CPU offload: FSDP1 keeps every unit's shard and a pre-allocated gradient shard, frozen units
  included, in pinned host memory, each block rounded up to a power of two by the CUDA host
  allocator, and its first step also holds the unpinned shards those were copied from; FSDP2
  pins parameter by parameter, with gradient shards for the adapters only.

On a GPU, what is allocated and freed every step is scaled by the caching allocator's reserve
(1.5, fitted to the guide's figures) and what lives for the whole run is not; on CPU ranks the
allocated total is scaled by the C allocator's measured retention of freed memory (as
training.allocator resolves). The CUDA context or a CPU rank's libraries are added; on CPU
ranks the CPU estimate is the ranks' memory. `device_load_gib` is a QLoRA model's load, whole
on each GPU before FSDP shards it, and is checked like the training peak. BENCHMARKS.md
("Memory estimator accuracy") compares the estimate with the source guide's figures and with
measured CPU runs, and lists what it does not explain.
"""

import torch

from shardtune.plan.attention import load_dtype_name

GIB = 1024**3

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "uint8": 1}

# PyTorch's CUDA caching allocator, reserved over allocated. What lives for the whole run (the
# sharded base weights, QLoRA's constants, the adapters' states) is allocated once, before any
# transient, in segments of its own, and costs nothing more. What is allocated and freed in each
# step (gathered layers, checkpoints, activations, working sets) is cached per stream and rounded,
# and the checkpoints that forward keeps pin splits of segments that the layers' transients
# were cut from (the fragmentation expandable segments were made for), so the reserve grows
# with it. Not measured here (no GPU): fitted to the guide's three per-GPU figures, which no
# single factor on the whole allocation fits (BENCHMARKS.md, "Memory estimator accuracy").
CUDA_TRANSIENT_RESERVE = 1.5

CONTEXT_GIB = 1.0  # CUDA context, NCCL buffers, cuBLAS workspace, kernels: on each GPU

# A CPU rank's resident memory over its live memory, by the C allocator it runs with
# (training.allocator), measured on the small model (BENCHMARKS.md, "Memory estimator
# accuracy"), less 0.55 GiB of libraries: glibc keeps much of what FSDP's per-layer gathers
# free (peak RSS 1.55-1.60 GiB against 1.17 GiB for the same run with a 128 KiB mmap threshold,
# whose RSS follows live memory); jemalloc, as shardtune.launch.allocator sets it up, returns freed
# pages within a second (1.18 GiB); tcmalloc (training.allocator auto, where installed) keeps
# its page heap in between (1.32-1.34 GiB, bench/throughput.py --paths ours-glibc,ours-tcmalloc);
# its factor holds from batch 1 to 32 on the tiny, small and deep models (-6% to +12%).
CPU_ALLOCATOR_RETENTION = {"system": 1.65, "jemalloc": 1.0, "tcmalloc": 1.3}

CPU_RANK_LIBRARIES_GIB = 0.55  # interpreter, torch, transformers, datasets of one CPU rank (measured)

GPU_RANK_HOST_GIB = 2.0  # host memory of one GPU rank: CUDA runtime, cuBLAS/cuDNN/NCCL, interpreter

TILE_TOKENS, TILE_VOCAB = 4096, 32768  # TRL's fused LM head: logits tile of tokens x vocabulary

# device terms allocated once for the whole run (the rest is allocated and freed every step)
PERSISTENT_TERMS = ("base_weights", "quant_state", "lora_states")


def _trains_on_cuda(settings, gpus_planned=0):
    """Whether the ranks will train on GPUs: flash attention needs one, the training job asks
    for GPUs (`gpus_planned`, or resources.fsdp_train in `settings`), or (a local run) this
    machine has one, as train.py decides."""
    if gpus_planned or settings["model"]["attn_implementation"] == "flash_attention_2":
        return True
    job = (settings.get("resources") or {}).get("fsdp_train")
    if job:
        from shardtune.launch.resources import gpus_per_node

        try:
            if gpus_per_node(job):
                return True
        except (KeyError, TypeError):
            pass
    return torch.cuda.is_available()


def _cpu_allocator(settings):
    """The C allocator CPU ranks will run with: training.allocator as shardtune.launch.allocator
    resolves it on this machine (system where that setting or module is absent)."""
    requested = settings["training"].get("allocator", "system")
    if requested == "system":
        return "system"
    try:
        from shardtune.launch.allocator import select

        return select(requested, gpus=0)[0]
    except (ImportError, ValueError):
        return "system"


def _pow2ceil(n):
    return 1 << max(0, int(n - 1).bit_length()) if n > 0 else 0


def _layer_saved_parts(shape, settings, act, cuda):
    """Bytes autograd keeps per token for the backward of one decoder layer (Llama-like), as
    (attention block, MLP block): backward frees the MLP block's before the attention's."""
    h, inter = shape["hidden"], shape["intermediate"]
    heads = shape.get("heads") or max(1, h // 64)
    kv_dim = (shape.get("kv_heads") or heads) * (h // heads)
    attn = settings["model"]["attn_implementation"]
    # RMSNorm (one per block) computes in fp32 and keeps its fp32 input for the variance's backward
    norm = h * 4
    # the attention kernel keeps q, k, v and its output; flash keeps k and v at the KV heads,
    # sdpa and eager get them repeated to every head (transformers' repeat_kv)
    kv = kv_dim if attn == "flash_attention_2" else h
    attention = (2 * h + 2 * kv) * act
    # MLP: SiLU keeps the gate projection; the product keeps SiLU's output and the up projection
    mlp = 3 * inter * act
    # LoRA: a frozen base linear keeps nothing (its weight needs no gradient), but lora_A keeps its
    # input (in the compute dtype): with dropout each target's own dropped-out copy, plus the
    # mask: bool in CUDA's native_dropout, on CPU a float tensor the input's size in the adapter
    # dtype (PEFT casts the input to it first: float32, bf16 for TRL's QLoRA adapters); without
    # dropout the shared inputs
    inputs = shape.get("layer_lora_inputs", 6 * h + inter)
    attention_inputs = shape.get("layer_lora_attention_inputs", min(inputs, 4 * h))
    adapter = 2 if settings["quantization"]["load_in_4bit"] else 4
    if settings["lora"].get("dropout", 0.1) > 0:
        per_input = act + (1 if cuda else adapter)
        lora_attention, lora_mlp = attention_inputs * per_input, (inputs - attention_inputs) * per_input
    else:
        lora_attention = min(attention_inputs, 2 * h) * act
        lora_mlp = min(inputs - attention_inputs, h + inter) * act
    return norm + attention + lora_attention, norm + mlp + lora_mlp


def _attention_scores(shape, settings, act, rows, row_len):
    """(bytes kept per layer, bytes of the backward's transients) of eager attention's
    probabilities: softmax runs in fp32 and keeps its output for backward; in a 16-bit compute
    dtype the cast copy that multiplies V is kept too. In backward the gradient of the
    probabilities (from the product with V, cast to fp32 in a 16-bit dtype) and softmax's input
    gradient exist together with the kept output. sdpa keeps no probabilities, but torch turns
    the boolean mask into an additive one in the query's dtype at every call and the kernel keeps
    it for backward: rows x L^2 per layer. Flash attention keeps neither."""
    attn = settings["model"]["attn_implementation"]
    if attn == "sdpa" or attn == "auto":
        return rows * row_len**2 * act, 0
    if attn != "eager":
        return 0, 0
    heads = shape.get("heads") or max(1, shape["hidden"] // 64)
    scores = rows * heads * row_len**2
    return scores * (4 + (act if act < 4 else 0)), scores * (act + 4 + (4 if act < 4 else 0))


def estimate(shape, settings, world_size, gpus_planned=0, flattened=None):
    """Per-device and CPU bytes for one training process of `world_size`. `gpus_planned`: GPUs
    per node the training job asks for, when this step may run on a node without them;
    `flattened` overrides the batch layout for sdpa/eager (True: one padding-free sequence of
    batch x L tokens, as TRL's padding-free collator makes; the reference recipe)."""
    q, f, t, d = settings["quantization"], settings["fsdp"], settings["training"], settings["data"]
    cuda = _trains_on_cuda(settings, gpus_planned)
    mixed = f["mixed_precision"] if t["bf16"] is None else ("bf16" if t["bf16"] else f["mixed_precision"])
    if mixed in ("bf16", "fp16"):
        act = 2  # autocast's dtype
    elif q["load_in_4bit"]:
        act = BYTES[q["bnb_4bit_compute_dtype"]]  # bitsandbytes computes in it
    else:
        act = 4
    load = BYTES[load_dtype_name(settings)]  # the dtype the weights load in
    # FSDP's MixedPrecision param_dtype; for QLoRA transformers sets it to the quant storage dtype
    gather = act if mixed in ("bf16", "fp16") and not q["load_in_4bit"] else load
    shard = 1 if f["sharding_strategy"] == "NO_SHARD" else world_size
    layers, h, inter = shape["layers"], shape["hidden"], shape["intermediate"]
    layer_linear = shape.get("layer_linear_params", shape["layer_params"])
    root_params = shape["params"] - layers * shape["layer_params"]  # embeddings, final norm, LM head

    if q["load_in_4bit"]:
        # nf4 packs 2 weights a byte into the storage dtype (what FSDP flattens and shards); the
        # quantization constants (absmax per 64 weights: fp32, or 8-bit plus fp32 per 256 blocks
        # nested) live in the module's quant_state, outside FSDP: whole on every GPU, also with
        # offload. The LM head and embeddings are not quantized.
        constants = 1 / 64 + 4 / (64 * 256) if q["use_nested_quant"] else 4 / 64
        quant_state = shape["linear_params"] * constants
        layer_bytes = layer_linear * 0.5 + (shape["layer_params"] - layer_linear) * load
        gathered_layer = layer_bytes  # packed weights are gathered packed
        # each 4-bit matmul dequantizes its weight to the compute dtype, forward and backward
        dequantized = shape.get("layer_largest_linear", 0) * act
        lora_bytes = 2  # TRL casts the adapters of a quantized model to bf16
    else:
        quant_state = dequantized = 0
        layer_bytes = shape["layer_params"] * load
        gathered_layer = shape["layer_params"] * gather
        lora_bytes = 4  # PEFT keeps adapter weights in float32 (autocast_adapter_dtype)
    root_bytes = root_params * load
    base = layers * layer_bytes + root_bytes
    # weights and gradients of the adapters, and Adam's two moments (torch AdamW: the param dtype)
    lora_states = shape["lora_params"] * 4 * lora_bytes
    # the device copy of a unit's shard that is all-gathered (the low-precision shard of FSDP's
    # mixed precision, or the copy brought from host memory with offload), freed once gathered
    shard_copy = layer_bytes / shard * gather / load if (f["offload_params"] or gather != load) else 0

    rows, row_len = t["per_device_train_batch_size"], d["max_seq_len"]
    tokens = rows * row_len
    if flattened is None:
        flattened = settings["model"]["attn_implementation"] == "flash_attention_2"  # collate.flattens_batches
    # sdpa/eager rows are [batch, L] (collate.PackedRowsCollator): L^2 per row and head; flattened,
    # they would be (batch x L)^2 per head
    score_rows, score_len = (1, tokens) if flattened else (rows, row_len)
    probs, probs_transient = _attention_scores(shape, settings, act, score_rows, score_len)
    attention_part, mlp_part = _layer_saved_parts(shape, settings, act, cuda)
    saved_attention, saved_mlp = tokens * attention_part + probs, tokens * mlp_part
    layer_saved = saved_attention + saved_mlp
    # backward of a layer starts with the MLP block, whose gradients of gate, up and product are
    # the largest tensors while everything the layer keeps is still there; eager attention's
    # gradients through softmax come after the MLP block's saved tensors are freed
    mlp_backward = tokens * 3 * inter * act
    # the block-diagonal causal mask transformers builds from the restarting position ids, shared
    # by all layers: additive in the compute dtype for eager, bool for sdpa; flash needs none
    attn = settings["model"]["attn_implementation"]
    mask = 0 if attn == "flash_attention_2" else score_rows * score_len**2 * (act if attn == "eager" else 1)
    if t["gradient_checkpointing"] or f["activation_checkpointing"]:
        kept = layers * tokens * h * act  # each layer's input; the layer is recomputed in backward
        layer_phase = max(layer_saved + mlp_backward, saved_attention + probs_transient)
    else:
        kept = layers * layer_saved
        layer_phase = max(mlp_backward, probs_transient - saved_mlp)
    # TRL's fused LM head: the final hidden state is kept, its fp32 gradient accumulated, and the
    # logits exist one tile at a time (on CPU the tile is also transformed in fp32)
    tile = min(tokens, TILE_TOKENS) * min(shape["vocab"], TILE_VOCAB) * (act + (4 if cuda else 8))
    loss_phase = tokens * h * (act + 4) + tile

    device = {
        "base_weights": 0 if f["offload_params"] else base / shard,
        "quant_state": quant_state,
        "gathered_layers": 2 * gathered_layer + shard_copy,  # the unit in use and the one prefetched
        # FSDP does not reshard the root unit after forward: it stays gathered until backward ends
        "root_params": root_params * gather,
        "dequantized_weight": dequantized,
        "lora_states": 0 if f["offload_params"] else lora_states / shard,
        "activations": kept + mask,  # kept across the whole forward and backward
        "layer_working_set": layer_phase,
        "logits": loss_phase,
    }
    peak_phase = "layer_working_set" if layer_phase >= loss_phase else "logits"
    allocated = sum(v for k, v in device.items() if k not in ("layer_working_set", "logits")) + device[peak_phase]
    if cuda:
        persistent = sum(device[k] for k in PERSISTENT_TERMS)
        device_total = persistent + (allocated - persistent) * CUDA_TRANSIENT_RESERVE + CONTEXT_GIB * GIB
    else:
        retention = CPU_ALLOCATOR_RETENTION.get(_cpu_allocator(settings), CPU_ALLOCATOR_RETENTION["system"])
        device_total = allocated * retention + CPU_RANK_LIBRARIES_GIB * GIB
    # QLoRA while loading (transformers 5): without a device_map the bitsandbytes quantizer puts
    # the whole quantized model on each rank's GPU before FSDP shards it
    load_device = base + quant_state + CONTEXT_GIB * GIB if q["load_in_4bit"] and cuda else 0

    per_machine = max(1, world_size // f["num_machines"])
    offloaded = unpinned = optimizer = 0
    if f["offload_params"]:
        lora_shards = shape["lora_params"] * lora_bytes / shard
        round_up = _pow2ceil if cuda else (lambda n: n)  # the CUDA host allocator's blocks
        if f.get("version", 1) == 2 and "layer_param_sizes" in shape:
            # FSDP2 shards, offloads and pins parameter by parameter; gradients are offloaded
            # only for parameters that have them (the adapters); the unpinned copy of each
            # shard is dropped as soon as it is pinned
            def packed(numel, quantizable):
                return numel * (0.5 if q["load_in_4bit"] and quantizable else load)

            per_layer = sum(round_up(packed(n, quant) / shard) for n, quant in shape["layer_param_sizes"])
            pinned = layers * per_layer + sum(round_up(n * load / shard) for n in shape["root_param_sizes"])
            offloaded = per_machine * (pinned + 2 * lora_shards)
        else:
            # FSDP1, per rank: one flat parameter per decoder layer, the root unit, and (PEFT's
            # wrap policy) one per LoRA A/B module. FSDP pins each shard and pre-allocates a
            # pinned gradient shard (_cpu_grad) for every unit, frozen ones included
            units = [layer_bytes / shard] * layers + [root_bytes / shard]
            pinned = sum(round_up(u) for u in units) + lora_shards
            offloaded = per_machine * 2 * pinned
            # the unpinned shards FSDP moved to CPU at wrap time stay referenced until each
            # unit's first unshard in the first forward
            unpinned = per_machine * (sum(units) + lora_shards)
        optimizer = per_machine * shape["lora_params"] * 2 * lora_bytes / shard  # Adam moments, on CPU
    if q["load_in_4bit"] and cuda:
        loading = 0  # quantized on each GPU while loading (see load_device)
    else:
        # with cpu_ram_efficient_loading only rank 0 reads the weights (train.entry.receives_weights:
        # the others build it on the meta device and receive it from FSDP), except a 4-bit model
        # and CPU ranks under FSDP1, where the launcher turns the setting off
        efficient = f["cpu_ram_efficient_loading"] and not q["load_in_4bit"] and (cuda or f["version"] == 2)
        loading = base * (1 if efficient else per_machine)
    cpu = {
        "offloaded": offloaded,  # pinned shards (and FSDP1's pinned gradient shards)
        "unpinned_shards": unpinned,  # FSDP1, first step only
        "optimizer": optimizer,
        "loading": loading,  # before FSDP wraps the model
        "processes": per_machine * (GPU_RANK_HOST_GIB if cuda else CPU_RANK_LIBRARIES_GIB) * GIB,
    }
    if not cuda:  # CPU ranks: what each holds for training is host memory too
        cpu["ranks"] = per_machine * (device_total - CPU_RANK_LIBRARIES_GIB * GIB)
    phases = {
        "loading": loading,
        "first_step": offloaded + unpinned,
        "training": offloaded + optimizer + cpu.get("ranks", 0),
    }
    cpu_phase = max(phases, key=phases.get)
    return {
        "world_size": world_size,
        "device_gib": device_total / GIB,
        "device_breakdown_gib": {k: v / GIB for k, v in device.items()},
        "device_allocated_gib": allocated / GIB,  # before the allocator's overhead and the context
        "device_peak_phase": peak_phase,  # the larger of the two working sets; the other is not counted
        "device_load_gib": load_device / GIB,
        "cpu_gib": (cpu["processes"] + phases[cpu_phase]) / GIB,
        "cpu_breakdown_gib": {k: v / GIB for k, v in cpu.items()},
        "cpu_peak_phase": cpu_phase,
        "on_cuda": cuda,
        "cpu_allocator": None if cuda else _cpu_allocator(settings),
        "shape": shape,
    }
