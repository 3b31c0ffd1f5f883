"""speed.lean_zero_step: DeepSpeed ZeRO-1/2's optimizer step without its per-parameter passes.

DeepSpeed 0.19.8's ZeRO-1/2 step (DeepSpeedZeroOptimizer.step) walks the parameters one by one twice before the
update: a bf16 overflow check (an inf/NaN test per gradient, summed, all-reduced and read back with .item()), and
the global gradient norm (per gradient: an fp64 copy, its norm, a copy back). On one H200 with the 3B model that
is ~2,600 + ~1,300 kernel launches and ~30 ms of kernels in a 160 ms step (bench/results,
profile_P_3b_h200x1_2026-12-04.txt). This replaces both:

- the norm: torch's multi-tensor norm over all gradients at once, accumulated in fp32 (the per-parameter norms'
  squares summed in fp64 as DeepSpeed does), then the same all-reduce, square root and inf/NaN masking;
- the bf16 overflow check: skipped where the step computes that norm (gradient clipping on). A non-finite
  gradient makes the global norm non-finite, which DeepSpeed's step already turns into a skipped step
  (``is_invalid_grad_norm``), so a NaN still skips the step, as before. fp16 (loss scaling), CPU offload, and runs
  without clipping keep DeepSpeed's own check.

Model parallelism and pipeline-replicated parameters (not used by sftjobs) fall back to DeepSpeed's own norm.
The same losses and gradient norms as stock: tests/test_lean_zero_step.py (real DeepSpeed on the CPU).
"""

from __future__ import annotations


def install(log=print) -> None:
    import torch
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.zero import stage_1_and_2
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    stock_norm = DeepSpeedZeroOptimizer.get_grad_norm_direct
    stock_check = DeepSpeedZeroOptimizer.check_overflow

    def get_grad_norm_direct(self, gradients, params, norm_type=2):
        gradients, params = list(gradients), list(params)
        if float(norm_type) != 2.0 or self.model_parallel_rank != 0 or \
                any(getattr(p, PIPE_REPLICATED, False) for p in params):
            return stock_norm(self, gradients, params, norm_type)
        grads = [g.detach() for g in gradients if not getattr(g, "_zero_padding", False)][:len(params)]
        if grads:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            total = torch.stack(norms).double().pow(2).sum().float()
        else:
            total = torch.tensor(0.0, dtype=torch.float32).to(self.device)
        stage_1_and_2.dist.all_reduce(total, op=stage_1_and_2.dist.ReduceOp.SUM, group=self.dp_process_group)
        self._model_parallel_all_reduce(tensor=total, op=stage_1_and_2.dist.ReduceOp.SUM)
        total = total.pow(0.5)
        stage_1_and_2.mask_nan_or_inf_with_val_inplace(total, device=self.device)
        return total

    def check_overflow(self, partition_gradients=True):
        if self.dtype == torch.bfloat16 and self.compute_grad_norm and not self.cpu_offload:
            self.overflow = False  # step()'s check of the global norm skips a non-finite step
            return
        stock_check(self, partition_gradients)

    DeepSpeedZeroOptimizer.get_grad_norm_direct = get_grad_norm_direct
    DeepSpeedZeroOptimizer.check_overflow = check_overflow
    log("lean ZeRO step: one multi-tensor gradient norm (fp32), no separate bf16 overflow pass (a non-finite "
        "norm still skips the step)")

