"""The memory plan: per-GPU memory of a training layout, and the fastest layout that fits.

``deepspeed: auto`` picks the ZeRO stage and gradient checkpointing from an estimate built on the model's
shape, the GPU memory (resources.gpu_memory_gib), the GPU count and the longest micro-batch
(train.cutoff_len x per_device_train_batch_size); ``batch.global_size`` derives gradient_accumulation_steps
from the GPU count. The result is a plain dict that goes into plan.json and the manifest.

Pure python: no torch or deepspeed import, so the submit host needs neither. The numbers are bf16 mixed
precision with DeepSpeed, calibrated against measurements of the Qwen2.5-3B shape on H100/H200
(bench/results; tests/test_memory_plan.py holds the calibration points).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftjobs.errors import SftjobsError
from sftjobs.planning.batch import HF_DEFAULT_BATCH, gradient_accumulation, world_size
from sftjobs.planning.model_shapes import DEMO_TOKENIZER_VOCAB, SYNTHETIC_SHAPES

if TYPE_CHECKING:
    from sftjobs.profile import Profile

GIB = 2**30
HEADROOM = 0.10          # of the GPU's memory, kept free
FRAGMENTATION = 0.05     # the caching allocator's reserved-but-unused share on top of the allocated peak
OVERHEAD_GIB = 2.5       # CUDA context, cuBLAS workspaces and NCCL buffers: outside torch's allocator
LF_DEFAULT_CUTOFF = 2048  # LLaMA-Factory 0.9.5's cutoff_len default

# Speed order: no recompute before recompute (recompute costs ~1/3 more compute), then the least sharding
# (z1 reduces gradients once per optimizer step, z2 every micro-step, z3 also gathers parameters, offload
# runs Adam on the CPU). The first that fits wins.
CANDIDATES: tuple[tuple[str, bool], ...] = (
    ("z1", False), ("z2", False), ("z3", False),
    ("z1", True), ("z2", True), ("z3", True), ("z3_offload", True),
)
# With train.disable_gradient_checkpointing set in the profile only the stage is chosen, in this order.
STAGE_ORDER = ("z1", "z2", "z3", "z3_offload")

# Hub ids whose shape sftjobs knows without the model's config.json (the shapes live in demo_assets).
KNOWN_MODELS = {
    "Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b",
    "Qwen/Qwen2.5-0.5B": "qwen2.5-0.5b",
    "Qwen/Qwen2.5-3B-Instruct": "qwen2.5-3b",
    "Qwen/Qwen2.5-3B": "qwen2.5-3b",
}
# Model types whose q/k/v projections carry a bias without saying so in config.json.
_QKV_BIAS_TYPES = {"qwen2"}

# ZeRO-1/2 keep one contiguous gradient bucket of reduce_bucket_size elements (templates/deepspeed.json.j2).
ZERO12_BUCKET_ELEMENTS = 500_000_000

# Activations per token of one decoder layer without recompute, in bytes per unit of hidden_size and of
# intermediate_size. Liger (fused RMSNorm, SwiGLU, RoPE): norm inputs, q/k/v/rope outputs, SDPA output,
# gate/up outputs and the down-projection input: ~13 x hidden + 6 x intermediate, fitted to the 3B probe
# (12.3 / 23.3 / 47.1 GiB for 3750 / 7300 / 14980 tokens). Without Liger, HF's RMSNorm keeps fp32 copies
# (+8 x hidden) and its SwiGLU the SiLU output too (+2 x intermediate).
LAYER_BYTES_LIGER = (13, 6)
LAYER_BYTES_HF = (21, 8)
# Loss without Liger, per logit (tokens x vocab): the forward holds bf16 logits (2) + their fp32 upcast (4)
# + fp32 log-probs (4); the backward of log_softmax holds its output, the incoming gradient and its result
# (4 + 4 + 4). 12 matches the plan's ZeRO-3 + offload run (29.7 GiB allocated at 15000 tokens).
CE_BYTES_PER_LOGIT = 12
EAGER_BYTES_PER_SCORE = 8  # flash_attn: disabled: bf16 scores + fp32 softmax + bf16 probabilities


# ----------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int
    tied: bool = True
    qkv_bias: bool = True
    mlp_bias: bool = False
    source: str = ""

    @property
    def params(self) -> int:
        return parameter_count(self)

    @property
    def layer_params(self) -> int:
        return _layer_params(self)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "params": self.params}


def _layer_params(s: ModelShape) -> int:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    attention = s.hidden * q + 2 * s.hidden * kv + q * s.hidden + ((q + 2 * kv) if s.qkv_bias else 0)
    mlp = 3 * s.hidden * s.intermediate + ((2 * s.intermediate + s.hidden) if s.mlp_bias else 0)
    return attention + mlp + 2 * s.hidden  # + the two RMSNorm weights


def parameter_count(s: ModelShape) -> int:
    """Embeddings (+ an untied lm_head), every decoder layer, the final norm."""
    embed = s.vocab * s.hidden
    return embed * (1 if s.tied else 2) + s.layers * _layer_params(s) + s.hidden


def shape_from_table(name: str) -> ModelShape:
    """A shape of model_shapes.SYNTHETIC_SHAPES (the real Qwen2.5 dimensions, tied embeddings as the hub's)."""
    dims = SYNTHETIC_SHAPES[name]
    return ModelShape(hidden=dims["hidden"], intermediate=dims["intermediate"], layers=dims["layers"],
                      heads=dims["heads"], kv_heads=dims["kv_heads"], vocab=dims["vocab"] or DEMO_TOKENIZER_VOCAB,
                      head_dim=dims["hidden"] // dims["heads"], tied=True, qkv_bias=True,
                      source=f"sftjobs' table ({name})")


def shape_from_config(cfg: dict[str, Any], source: str = "config.json") -> ModelShape:
    """A decoder-only transformer's shape from its config.json (Qwen2, Llama, Mistral style keys)."""
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return ModelShape(
            hidden=hidden, intermediate=int(cfg["intermediate_size"]), layers=int(cfg["num_hidden_layers"]),
            heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads), vocab=int(cfg["vocab_size"]),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            # transformers' Qwen2/Llama configs default to untied; the hub's small Qwen2.5 say true
            tied=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") in _QKV_BIAS_TYPES)),
            mlp_bias=bool(cfg.get("mlp_bias", False)), source=source)
    except (KeyError, TypeError, ValueError) as exc:
        raise SftjobsError(f"{source} lacks a usable {exc} (a decoder-only model needs hidden_size, "
                           "intermediate_size, num_hidden_layers, num_attention_heads and vocab_size)") from None


def model_shape(model: dict[str, Any], model_dir: str | None) -> ModelShape:
    """config.json in the model folder when it is already there, else sftjobs' table; else an error."""
    config = Path(model_dir) / "config.json" if model_dir else None
    if config is not None and config.is_file():
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SftjobsError(f"cannot read the model's {config} for the memory plan: {exc}") from None
        return shape_from_config(cfg, str(config))
    if model["source"] == "synthetic":
        return shape_from_table(model["synthetic_shape"])
    if model["source"] == "hub" and model.get("hub_id") in KNOWN_MODELS:
        return shape_from_table(KNOWN_MODELS[model["hub_id"]])
    what = f"model.hub_id {model.get('hub_id')}" if model["source"] == "hub" else f"model.path {model.get('path')}"
    raise SftjobsError(
        f"deepspeed: auto needs the model's shape, but {config or model_dir} does not exist yet and {what} is not "
        f"in sftjobs' table ({', '.join(KNOWN_MODELS)}). Download the model into model.local_dir first (its "
        "config.json is enough), or set deepspeed to a fixed stage (z1, z2, z3, z3_offload)")


# ----------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Workload:
    """The longest micro-batch one GPU sees, and how its optimizer step runs."""

    cutoff_len: int
    batch_size: int
    liger: bool
    attention: str = "auto"        # train.flash_attn: disabled = eager attention (quadratic in tokens)
    block_mask: bool = False       # neat_packing with LLaMA-Factory's 4D block-diagonal mask
    fused_update: bool = False     # speed.fused_zero_update: ZeRO-1/2's step makes no fp32 gradient copy
    loss_chunk_mem: int = 1        # speed.liger_chunk_mem_const: Liger's chunk budget (its chunk_mem_const)

    @property
    def tokens(self) -> int:
        return self.cutoff_len * self.batch_size


def liger_chunk_tokens(tokens: int, vocab: int, hidden: int, chunk_mem_const: int = 1) -> int:
    """Tokens per chunk of Liger 0.8.5's fused linear cross-entropy (ops/fused_linear_cross_entropy.py): the
    transient logits stay within chunk_mem_const x tokens x hidden elements."""
    inc_factor = -(-vocab // (chunk_mem_const * hidden))
    return min(1 << (-(-tokens // inc_factor) - 1).bit_length(), tokens)


def activation_bytes(s: ModelShape, w: Workload, recompute: bool, layers_recomputed: int | None = None) -> dict[str, int]:
    """Activations of one micro-batch at the start of the backward pass, by part. ``layers_recomputed`` (0 to
    s.layers; default all with recompute, none without) is how many decoder layers keep only their input."""
    t = w.tokens
    k = (s.layers if recompute else 0) if layers_recomputed is None else layers_recomputed
    per_hidden, per_intermediate = LAYER_BYTES_LIGER if w.liger else LAYER_BYTES_HF
    per_layer = per_hidden * s.hidden + per_intermediate * s.intermediate
    # A recomputed layer keeps only its input (bf16). The recomputed layers are the first k: the backward pass
    # reaches them after the others' activations are freed, and recomputes one at a time, so the peak holds the
    # kept layers' activations, or one recomputed layer's when all are recomputed.
    full = max(s.layers - k, 1 if k else 0)
    layers = k * t * s.hidden * 2 + full * t * per_layer
    if w.liger:
        # Fused linear cross-entropy: chunked logits, gradients computed in the forward pass (the lm_head's
        # weight gradient, V x h in bf16, and the input gradient) and kept until the backward pass.
        # Liger's chunk: next_power_of_2(ceil(tokens / ceil(vocab / (chunk_mem_const * hidden)))) rows of logits
        chunk = liger_chunk_tokens(t, s.vocab, s.hidden, w.loss_chunk_mem)
        logits = 2 * s.vocab * s.hidden + 2 * t * s.hidden + 4 * chunk * s.vocab
    else:
        logits = CE_BYTES_PER_LOGIT * t * s.vocab
    attention = 0
    if w.attention == "disabled":
        attention = full * w.batch_size * s.heads * w.cutoff_len ** 2 * EAGER_BYTES_PER_SCORE
    if w.block_mask:
        attention += w.batch_size * w.cutoff_len ** 2 * 2
    return {"layers": layers, "logits": logits, "attention": attention}


def model_state_bytes(s: ModelShape, stage: str, world: int, fused_update: bool = False) -> dict[str, int]:
    """Parameters, gradients, optimizer states and DeepSpeed buffers per GPU (bf16 with fp32 Adam).

    Sharded over ``world`` GPUs: ZeRO-1 the fp32 master weights and Adam's moments (12 bytes a parameter),
    ZeRO-2 the bf16 gradients too, ZeRO-3 the bf16 parameters too; offload keeps them on the CPU. ``step``
    is the fp32 gradient partition that exists only during the optimizer step (no activations then); with
    ``fused_update`` (speed.fused_zero_update) ZeRO-1/2's step holds only the flat bf16 copy of the gradient
    partition (the kernel reads it directly; 63.3 -> 51.8 GiB allocated for fast on 1x H100, bench/results).
    """
    n = s.params
    largest = s.vocab * s.hidden
    # ZeRO-3 gathers a module's parameters when it runs: the embedding (and its gradient before the
    # reduce-scatter) is the largest, plus the current and the prefetched layer.
    gathered = 2 * 2 * largest + 2 * 2 * s.layer_params
    bucket = 2 * ZERO12_BUCKET_ELEMENTS
    table = {
        "none": (4 * n, 4 * n, 8 * n, 0, 0),   # no DeepSpeed: LLaMA-Factory trains fp32 weights under autocast
        "z0": (2 * n, 2 * n, 12 * n, 0, 0),
        "z1": (2 * n, 2 * n, 12 * n // world, bucket, 4 * n // world),
        "z2": (2 * n, 2 * n // world, 12 * n // world, bucket, 4 * n // world),
        "z2_offload": (2 * n, 0, 0, bucket, 0),
        "z3": (2 * n // world, 2 * n // world, 12 * n // world, gathered, 4 * n // world),
        "z3_offload": (0, 0, 0, gathered, 0),
    }
    params, grads, optimizer, buffers, step = table[stage]
    if fused_update and stage in ("z1", "z2"):
        step = 2 * n // world
    return {"params": params, "grads": grads, "optimizer": optimizer, "buffers": buffers, "step": step}


def estimate(s: ModelShape, stage: str, recompute: bool, world: int, w: Workload, gpu_memory_gib: float,
             layers_recomputed: int | None = None) -> dict[str, Any]:
    """One layout's per-GPU estimate, in GiB: the allocated peak and the total it needs of the GPU."""
    states = model_state_bytes(s, stage, world, w.fused_update)
    acts = activation_bytes(s, w, recompute, layers_recomputed)
    activations = sum(acts.values())
    fixed = states["params"] + states["grads"] + states["optimizer"] + states["buffers"]
    allocated = fixed + max(activations, states["step"])
    total = allocated * (1 + FRAGMENTATION) + OVERHEAD_GIB * GIB
    usable = gpu_memory_gib * (1 - HEADROOM) * GIB

    def gib(x: float) -> float:
        return round(x / GIB, 2)

    return {"stage": stage, "recompute": recompute,
            "params_gib": gib(states["params"]), "grads_gib": gib(states["grads"]),
            "optimizer_gib": gib(states["optimizer"]), "buffers_gib": gib(states["buffers"]),
            "activations_gib": gib(activations), "logits_gib": gib(acts["logits"]),
            "allocated_gib": gib(allocated), "total_gib": gib(total), "fits": total <= usable}


def label(stage: str, recompute: bool) -> str:
    return f"{stage}, {'recompute' if recompute else 'no recompute'}"


# ----------------------------------------------------------------------------- the plan


def _workload(train: dict[str, Any], speed: dict[str, Any]) -> Workload:
    attention = str(train.get("flash_attn", "auto"))
    block_mask = bool(train.get("neat_packing")) and attention not in ("fa2", "fa3") \
        and not speed.get("per_sample_attention")
    # the fused update applies in bf16 with torch's AdamW (LLaMA-Factory's and the Trainer's default optimizers)
    fused_update = bool(speed.get("fused_zero_update")) and bool(train.get("bf16")) and \
        str(train.get("optim", "adamw_torch_fused")) in ("adamw_torch", "adamw_torch_fused")
    return Workload(cutoff_len=int(train.get("cutoff_len", LF_DEFAULT_CUTOFF)),
                    batch_size=int(train.get("per_device_train_batch_size", HF_DEFAULT_BATCH)),
                    liger=bool(train.get("enable_liger_kernel")), attention=attention, block_mask=block_mask,
                    fused_update=fused_update, loss_chunk_mem=int(speed.get("liger_chunk_mem_const") or 1))


def choose_layout(shape: ModelShape, world: int, w: Workload, gpu_memory_gib: float,
                  recompute: bool | None = None) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Every candidate's estimate in speed order, and the first that fits (None when none does).

    ``recompute`` set (the profile sets train.disable_gradient_checkpointing): only the stage is chosen.
    """
    order = list(CANDIDATES) if recompute is None else [(stage, recompute) for stage in STAGE_ORDER]
    candidates = [estimate(shape, stage, rc, world, w, gpu_memory_gib) for stage, rc in order]
    return candidates, next((c for c in candidates if c["fits"]), None)


def _largest_cutoff_that_fits(s: ModelShape, stage: str, recompute: bool, world: int, w: Workload,
                              gpu_memory_gib: float, layers_recomputed: int | None = None) -> int:
    lo, hi = 0, w.cutoff_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(s, stage, recompute, world, dataclasses.replace(w, cutoff_len=mid), gpu_memory_gib,
                    layers_recomputed)["fits"]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def recompute_schedule(s: ModelShape, stage: str, world: int, w: Workload, gpu_memory_gib: float) -> list[int]:
    """speed.recompute_by_length: entry k (0 to s.layers) is the most tokens a micro-batch may hold, by this
    estimate, with its first k decoder layers recomputed and the rest keeping their activations; at most the longest
    micro-batch (cutoff_len x per_device_train_batch_size). For each micro-batch the trainer recomputes the fewest
    layers whose entry holds its tokens, and all of them where none does (sftjobs/trainer/recompute_by_length.py)."""
    one_row = dataclasses.replace(w, cutoff_len=w.tokens, batch_size=1)
    return [_largest_cutoff_that_fits(s, stage, True, world, one_row, gpu_memory_gib, k) for k in range(s.layers + 1)]


def _nothing_fits(where: str, shape: ModelShape, world: int, w: Workload, gpu_gib: float,
                  last: dict[str, Any], recompute: bool | None) -> SftjobsError:
    cutoff = _largest_cutoff_that_fits(shape, last["stage"], last["recompute"], world, w, gpu_gib)
    fixes = [f"more GPUs (resources.gpus_per_node / resources.nodes; now {world})",
             f"train.cutoff_len {cutoff} or less" if cutoff else "a smaller train.cutoff_len"]
    if w.batch_size > 1:
        fixes.append("train.per_device_train_batch_size: 1")
    if not w.liger:
        fixes.append("train.enable_liger_kernel: true (no full logits)")
    if recompute is False:
        fixes.append("no train.disable_gradient_checkpointing, so that recompute can be chosen")
    usable = gpu_gib * (1 - HEADROOM)
    return SftjobsError(
        f"{where}: deepspeed: auto finds no layout that fits: the smallest estimate is {last['total_gib']:.1f} GiB "
        f"per GPU ({label(last['stage'], last['recompute'])} on {world} GPU(s), cutoff_len {w.cutoff_len} x batch "
        f"{w.batch_size}) but resources.gpu_memory_gib is {gpu_gib:g} ({usable:.1f} usable after {HEADROOM:.0%} "
        f"headroom). Use one of: {'; '.join(fixes)}")


def plan_memory(profile: Profile, model_dir: str | None) -> dict[str, Any] | None:
    """The memory plan of a profile, or None when it asks for none (no deepspeed: auto, no batch.global_size).

    ``model_dir`` is the absolute model folder of the run: its config.json, when already there, gives the shape.
    Under a fixed deepspeed stage (batch.global_size only) the estimate is a record, never a reason to fail.
    """
    v = profile.values
    deepspeed, global_size = v["deepspeed"], v["batch"]["global_size"]
    if deepspeed != "auto" and global_size is None:
        return None
    where = profile.source + (f" (with --set {' '.join(profile.overrides)})" if profile.overrides else "")
    train, res, model = profile.train, v["resources"], v["model"]
    world = world_size(res)
    w = _workload(train, v.get("speed") or {})
    gpu_gib = res["gpu_memory_gib"]
    # None: the plan chooses recompute; True/False: the profile set train.disable_gradient_checkpointing itself
    fixed_recompute = (not train["disable_gradient_checkpointing"]) if "disable_gradient_checkpointing" in train else None
    try:
        ga = gradient_accumulation(v)
    except SftjobsError as exc:
        raise SftjobsError(f"{where}: {exc}") from None
    shape = None
    if deepspeed == "auto" or res["gpus_per_node"]:
        try:
            shape = model_shape(model, model_dir)
        except SftjobsError as exc:
            if deepspeed == "auto":
                raise SftjobsError(f"{where}: {exc}") from None

    if shape is not None and deepspeed == "auto":
        candidates, chosen = choose_layout(shape, world, w, gpu_gib, fixed_recompute)
        if chosen is None:
            raise _nothing_fits(where, shape, world, w, gpu_gib, candidates[-1], fixed_recompute)
        stage, recompute = chosen["stage"], chosen["recompute"]
        reason = (f"{label(stage, recompute)} is the fastest layout that fits (est. {chosen['total_gib']:.1f} of "
                  f"{gpu_gib * (1 - HEADROOM):.1f} usable GiB)")
        slower = candidates[:candidates.index(chosen)]
        if slower:
            reason += "; " + ", ".join(f"{label(c['stage'], c['recompute'])} needs {c['total_gib']:.1f}" for c in slower)
        if fixed_recompute is not None:
            reason += "; recompute as the profile's train.disable_gradient_checkpointing says"
    else:
        stage = deepspeed
        recompute = True if fixed_recompute is None else fixed_recompute  # LLaMA-Factory recomputes by default
        candidates = [estimate(shape, stage, recompute, world, w, gpu_gib)] if shape else []
        chosen = candidates[0] if candidates else None
        reason = f"deepspeed: {deepspeed} as the profile sets it; batch.global_size {global_size} gives ga {ga}"

    schedule = None
    if (v.get("speed") or {}).get("recompute_by_length") and recompute and shape is not None:
        schedule = recompute_schedule(shape, stage, world, w, gpu_gib)
        most = next((k for k, tokens in enumerate(schedule) if tokens >= w.tokens), shape.layers)
        reason += (f"; recompute by length (speed.recompute_by_length): no layer for a micro-batch of up to "
                   f"{schedule[0]} tokens, {most} of {shape.layers} for the longest ({w.tokens})")

    inputs = {
        "model": {"hub": model["hub_id"], "path": model["path"]}.get(model["source"],
                                                                    f"synthetic {model['synthetic_shape']}"),
        "shape_source": shape.source if shape else None, "params": shape.params if shape else None,
        "shape": {k: x for k, x in shape.to_dict().items() if k not in ("source", "params")} if shape else None,
        "gpu_memory_gib": gpu_gib, "headroom": HEADROOM, "fragmentation": FRAGMENTATION, "overhead_gib": OVERHEAD_GIB,
        "world": world, "nodes": res["nodes"], "gpus_per_node": res["gpus_per_node"], "cutoff_len": w.cutoff_len,
        "per_device_train_batch_size": w.batch_size, "liger": w.liger,
        "packing": bool(train.get("packing") or train.get("neat_packing")), "neat_packing": bool(train.get("neat_packing")),
        "attention": w.attention, "recompute_from_profile": fixed_recompute, "fused_zero_update": w.fused_update,
        "liger_chunk_mem_const": w.loss_chunk_mem,
    }
    return {"mode": "auto" if deepspeed == "auto" else "fixed", "inputs": inputs, "candidates": candidates,
            "stage": stage, "recompute": recompute, "disable_gradient_checkpointing": not recompute,
            "recompute_by_tokens": schedule,
            "per_device_train_batch_size": w.batch_size, "gradient_accumulation_steps": ga,
            "global_batch": w.batch_size * ga * world,
            "global_batch_from": "batch.global_size" if global_size is not None else "profile",
            "estimate_gib": chosen["total_gib"] if chosen else None,
            "usable_gib": round(gpu_gib * (1 - HEADROOM), 2), "reason": reason}


def apply_plan(profile: Profile, plan: dict[str, Any] | None) -> Profile:
    """The profile the run's files are rendered from: the plan's stage, batch layout and recompute.

    The profile itself (profile.yaml, config_hash) keeps what the user wrote.
    """
    if plan is None:
        return profile
    values = copy.deepcopy(profile.values)
    values["deepspeed"] = plan["stage"]
    train = values["train"]
    train.setdefault("per_device_train_batch_size", plan["per_device_train_batch_size"])
    if plan["global_batch_from"] == "batch.global_size":
        train["gradient_accumulation_steps"] = plan["gradient_accumulation_steps"]
    if plan["mode"] == "auto" and plan["inputs"]["recompute_from_profile"] is None:
        train["disable_gradient_checkpointing"] = plan["disable_gradient_checkpointing"]
    return dataclasses.replace(profile, values=values)


def summary_line(plan: dict[str, Any]) -> str:
    """``memory plan: z2, no recompute, bs 1 x ga 2 x 8 GPUs = 16; est. 61.2 of 80 GiB``"""
    inputs = plan["inputs"]
    world = inputs["world"]
    procs = f"{world} GPU{'s' if world != 1 else ''}" if inputs["gpus_per_node"] else "1 CPU process"
    stage = plan["stage"] if plan["mode"] == "auto" else f"{plan['stage']} (set in the profile)"
    layout = label(stage, plan["recompute"]) + (" by length" if plan.get("recompute_by_tokens") else "")
    line = (f"memory plan: {layout}, bs {plan['per_device_train_batch_size']} x ga "
            f"{plan['gradient_accumulation_steps']} x {procs} = {plan['global_batch']}")
    if plan["estimate_gib"] is not None:
        line += f"; est. {plan['estimate_gib']:.1f} of {inputs['gpu_memory_gib']:g} GiB"
    return line
