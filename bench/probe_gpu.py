"""Single-GPU probes in plain PyTorch (no trainer, no DeepSpeed): what the hardware can do for this model.

    python bench/probe_gpu.py MODEL_DIR_OR_SHAPE OUT.json     (a shape: qwen2.5-3b etc., random init on the GPU)
    python bench/probe_gpu.py --peak-only OUT.json
    python bench/probe_gpu.py --sdpa-op                       (prints the SDPA kernel torch picks here)
    python bench/probe_gpu.py --attn OUT.json                 (per-sample attention: varlen call vs SDPA loop)

1. bf16 matmul peak (8192^3, the MFU denominator), measured here.
2. The model in bf16 with Liger's Qwen2 kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy):
   forward+backward time of one sample of L tokens (L = 3750, the data's mean; and the long tail) with and
   without gradient checkpointing -> the compute floor of one micro-step, to set against a trainer's step time.
3. Peak memory of forward+backward at L = 14980 (the longest sample) without gradient checkpointing, minus
   the bf16 weights + grads: what activations need when recompute is off.
4. Attention of one 15000-token pack holding 4 samples: 4D block-diagonal mask SDPA (what LLaMA-Factory's
   neat_packing does without flash-attn) vs causal flash SDPA per sample (speed.per_sample_attention).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F


class _Len:
    """A stand-in tokenizer for qwen2_config: a length and the two special ids."""

    def __init__(self, n, tok):
        self.n, self.tok = n, tok

    def __len__(self):
        return self.n

    def convert_tokens_to_ids(self, t):
        return self.tok.convert_tokens_to_ids(t)


def timed(fn, n: int = 3, warm: int = 1) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    dt = timed(lambda: a @ b, n=50, warm=10)
    return 2 * 8192**3 / dt


def sdpa_op() -> str:
    """The aten op SDPA dispatches to for a causal bf16 GQA call of the 3B shape (cuDNN, flash, efficient, math)."""
    q = torch.randn(1, 16, 1000, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 1000, 128, device="cuda", dtype=torch.bfloat16)
    with torch.profiler.profile() as prof:
        F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
    return " ".join(sorted({e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")}))


def attn_kernels(out: str) -> None:
    """sftjobs' per-sample attention (the function the trainer calls) on packs of the 3B attention shape, fwd+bwd of
    one layer: as sftjobs runs it, with every run through torch's flash varlen kernel, and causal SDPA once per
    sample (no varlen kernel); SDPA as torch picks it here (cuDNN first on an H100 unless
    TORCH_CUDNN_SDPA_DEPRIORITIZED=1), as training runs it (flash: sftjobs_flash), and cuDNN with lengths padded
    to a bucket (sftjobs_cudnnN: per_sample_attention.CUDNN_BUCKET)."""
    from sftjobs.trainer.attention import per_sample as psa

    H, Hkv, D = 16, 2, 128
    packs = {"fast_pack_4x3750": [3000, 4000, 5000, 3000], "prod_pack_2": [5200, 2300], "one_sample": [3750],
             "pack_of_20_short": [750] * 20, "longest": [14980]}
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                 "varlen_available": psa.varlen_causal() is not None, "ms_fwd_bwd_one_layer": {}}
    for name, lens in packs.items():
        L = sum(lens)
        q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        row = {}
        pos = torch.cat([torch.arange(n, device="cuda") for n in lens])[None]  # one forward's: boundaries cached
        short, kernel = psa.SHORT_SAMPLE, psa.varlen_causal
        # sftjobs: runs of short samples in varlen calls, SDPA for the rest; runs_all: every run of >= 2 samples in
        # a varlen call whatever their length; loop: SDPA per sample
        for label, varlen, threshold in (("sftjobs", True, short), ("runs_all", True, 10**9), ("loop", False, short)):
            def call(varlen=varlen, threshold=threshold, q=q, k=k, v=v, pos=pos, kernel=kernel):
                psa.varlen_causal, psa.SHORT_SAMPLE = (kernel if varlen else lambda: None), threshold
                o, _ = psa.per_sample_sdpa(None, q, k, v, None, scaling=D ** -0.5, position_ids=pos)
                o.sum().backward()
            row[label] = round(1000 * timed(call, n=10, warm=3), 3)
        psa.varlen_causal, psa.SHORT_SAMPLE = kernel, short
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def call_flash(q=q, k=k, v=v, pos=pos):  # what training runs with SDPA off cuDNN (launcher.setup)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                o, _ = psa.per_sample_sdpa(None, q, k, v, None, scaling=D ** -0.5, position_ids=pos)
            o.sum().backward()
        row["sftjobs_flash"] = round(1000 * timed(call_flash, n=10, warm=3), 3)
        for bucket in (256, 128):  # sftjobs with single samples through cuDNN, padded to a multiple of bucket
            def call_cudnn(bucket=bucket, q=q, k=k, v=v, pos=pos):
                psa.CUDNN_BUCKET = bucket
                o, _ = psa.per_sample_sdpa(None, q, k, v, None, scaling=D ** -0.5, position_ids=pos)
                o.sum().backward()
            try:
                row[f"sftjobs_cudnn{bucket}"] = round(1000 * timed(call_cudnn, n=10, warm=3), 3)
            except RuntimeError as e:
                row[f"sftjobs_cudnn{bucket}"] = f"error: {str(e)[:200]}"
            psa.CUDNN_BUCKET = 0
        res["ms_fwd_bwd_one_layer"][name] = row
        print(name, row, flush=True)
    res["cudnn"] = cudnn_costs(H, Hkv, D)
    print("cudnn", res["cudnn"], flush=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


def cudnn_costs(H: int, Hkv: int, D: int) -> dict:
    """Which op a cuDNN-first causal GQA call runs, and what a new length costs it: first fwd+bwd at fresh
    lengths (graph builds) against the same lengths again (cached), and the kernel against flash at 3750/14980."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fwd_bwd(L, backends):
        q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        with sdpa_kernel(backends, set_priority=True):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
        return q, k, v

    cudnn = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    res: dict = {}
    with torch.profiler.profile() as prof:
        fwd_bwd(1000, cudnn)
    res["op"] = " ".join(sorted({e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")}))
    lengths = [3001 + 7 * i for i in range(8)]
    torch.cuda.synchronize()
    for label in ("first_ms_per_length", "cached_ms_per_length"):
        t = time.perf_counter()
        for L in lengths:
            fwd_bwd(L, cudnn)
        torch.cuda.synchronize()
        res[label] = round(1000 * (time.perf_counter() - t) / len(lengths), 2)
    for L in (3750, 14980):
        for name, backends in (("cudnn", cudnn), ("flash", [SDPBackend.FLASH_ATTENTION])):
            q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)

            def call(q=q, k=k, v=v, backends=backends):
                with sdpa_kernel(backends, set_priority=True):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
            res[f"{name}_{L}_ms"] = round(1000 * timed(call, n=10, warm=3), 3)
    return res


def main() -> None:
    if sys.argv[1] == "--sdpa-op":
        print(sdpa_op())
        return
    if sys.argv[1] == "--attn":
        attn_kernels(sys.argv[2])
        return
    model_dir, out = sys.argv[1], sys.argv[2]
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    res["matmul_bf16_tflops"] = round(matmul_peak() / 1e12, 1)
    print(json.dumps(res), flush=True)
    if model_dir == "--peak-only":
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
        return

    from transformers import AutoModelForCausalLM

    if os.path.isdir(model_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    else:  # a shape name: random init on the GPU, nothing saved
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        from types import SimpleNamespace

        from sftjobs.io.demo_assets import qwen2_config

        tok = SimpleNamespace(convert_tokens_to_ids=lambda t: {"<|im_end|>": 2, "<|endoftext|>": 0}[t], __len__=None)
        cfg = qwen2_config(model_dir, _Len(8192, tok))
        cfg._attn_implementation = "sdpa"
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
        res["shape"] = model_dir
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(model=model)
        res["liger"] = True
    except Exception as exc:  # noqa: BLE001
        res["liger"] = f"failed: {exc!r}"[:200]
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    res["n_params"] = n_params
    def step(m, L: int):
        ids = torch.randint(3, 8000, (1, L), device="cuda")
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()

    for gc in (True, False):
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        for L in (3750, 7300, 14980):
            key = f"fwd_bwd_s_L{L}_gc{int(gc)}"
            try:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                dt = timed(lambda L=L, m=model: step(m, L), n=2, warm=1)
                res[key] = round(dt, 4)
                flops = (8 if gc else 6) * n_params * L
                res[key.replace("fwd_bwd_s", "tflops")] = round(flops / dt / 1e12, 1)
                res[key.replace("fwd_bwd_s", "peak_GiB")] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                res[key.replace("fwd_bwd_s", "act_GiB")] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)
            except torch.OutOfMemoryError:
                res[key] = "OOM"
            model.zero_grad(set_to_none=False)  # keep bf16 grads allocated: as in training
            print(json.dumps({k: v for k, v in res.items() if k.endswith(f"_gc{int(gc)}")}), flush=True)
    res["weights_plus_grads_GiB"] = round(2 * 2 * n_params / 2**30, 2)
    del model
    torch.cuda.empty_cache()

    # attention of one 15000-token pack of 4 samples (3B shape: 16 heads, 2 KV heads, head dim 128)
    H, Hkv, D, lens = 16, 2, 128, [3000, 4000, 5000, 3000]
    L = sum(lens)
    q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    idx = torch.cat([torch.full((n,), i, device="cuda") for i, n in enumerate(lens)])
    mask = (idx[:, None] == idx[None, :]) & torch.ones(L, L, dtype=torch.bool, device="cuda").tril()
    fmask = torch.zeros(L, L, device="cuda", dtype=torch.bfloat16).masked_fill(~mask, torch.finfo(torch.bfloat16).min)

    def masked():
        kk, vv = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        F.scaled_dot_product_attention(q, kk, vv, attn_mask=fmask[None, None]).sum().backward()

    def segmented():
        outs, s = [], 0
        for n in lens:
            outs.append(F.scaled_dot_product_attention(q[:, :, s:s + n], k[:, :, s:s + n], v[:, :, s:s + n],
                                                       is_causal=True, enable_gqa=True))
            s += n
        torch.cat(outs, 2).sum().backward()

    res["attn_pack15000_4samples_fwd_bwd_ms_4Dmask"] = round(1000 * timed(masked, n=3), 2)
    res["attn_pack15000_4samples_fwd_bwd_ms_segmented"] = round(1000 * timed(segmented, n=3), 2)
    print(json.dumps(res, indent=1), flush=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
