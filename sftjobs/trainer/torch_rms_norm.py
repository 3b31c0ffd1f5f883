"""speed.torch_rms_norm: with Liger on, each RMSNorm runs as torch's fused rms_norm instead of Liger's Triton kernel.

LLaMA-Factory's ``enable_liger_kernel`` replaces the model's RMSNorm class with Liger's (LigerRMSNorm). Its
kernels are fast on the GPU, but each call goes through Liger's Python wrapper and Triton's launcher: on 1x H100
with prod's step (bench/results/profile_P_3b_h100x1_2026-12-06.txt, under the profiler) a LigerRMSNorm forward cost
~157 us of CPU and its backward ~208 us, against ~76 us for a whole ``aten::linear``; prod's step waits on the CPU's
launches (bench/results/gaps_P_3b_h100x1_2026-12-06.txt). torch (2.8 and later) has its own fused rms_norm on CUDA
(``torch._fused_rms_norm``: one kernel forward, the backward's dX and dW kernels), reached through
``torch.nn.functional.rms_norm`` at the cost of one aten call.

The arithmetic: Liger's "llama" casting mode (Qwen2's) normalises in fp32, rounds to the input's dtype, then
multiplies by the weight in that dtype (two roundings in bf16), as transformers' Qwen2RMSNorm does; torch's kernel
multiplies by the weight in fp32 and rounds once. In fp32 both are the same function; in bf16 they differ by the
one rounding (tests/test_torch_rms_norm.py on the CPU, tests/test_torch_rms_norm_gpu.py against Liger's kernel on a
GPU). Only LigerRMSNorm modules of that kind are switched (offset 0, the "llama" casting mode, a weight), and only
where input and weight share a dtype (torch's fused kernel needs that; otherwise it falls back to separate
operations); the rest (Gemma's offset, other casting modes, no weight, mixed dtypes) keep Liger's forward.
"""

from __future__ import annotations


def applies(module) -> bool:
    """Whether torch's rms_norm computes what this LigerRMSNorm computes (up to bf16 rounding)."""
    return (getattr(module, "weight", None) is not None and float(getattr(module, "offset", 0.0)) == 0.0
            and getattr(module, "casting_mode", None) == "llama")


def install(log=print) -> None:
    import torch
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    liger_forward = LigerRMSNorm.forward

    def forward(self, hidden_states):
        if not applies(self) or hidden_states.dtype != self.weight.dtype:  # torch's fused kernel wants one dtype
            return liger_forward(self, hidden_states)
        return torch.nn.functional.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)

    LigerRMSNorm.forward = forward
    log("torch rms_norm: Liger's RMSNorm modules (offset 0, llama casting) run torch's fused rms_norm")
