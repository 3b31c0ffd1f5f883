"""speed.fused_zero_update: DeepSpeed ZeRO-1/2's bf16 update of this rank's partition in one pass over memory.

DeepSpeed 0.19.8's step (DeepSpeedZeroOptimizer.step), after the gradient norm, goes over the partition five
times: the flat bf16 gradient is cast into a new fp32 tensor, multiplied by the clip coefficient, handed to the
optimizer (torch's AdamW: the fp32 master weights and both moments), and the updated fp32 weights are copied
back into the bf16 weights the model computes with. With the 3B model on one GPU that is ~80 GB of traffic
besides AdamW's own, and a 12 GB fp32 gradient allocated per step.

This runs the same update as one kernel per parameter group (Triton, on CUDA): it reads the bf16 gradient and
the clip coefficient (a tensor on the GPU, so no synchronisation), applies torch's AdamW to the fp32 master
weights and moments, and writes the bf16 weights. The formula is torch's (decoupled weight decay, bias
corrections, eps outside the square root) in the arithmetic of torch's single-tensor AdamW; torch's fused AdamW
(the Trainer's default optim) rounds its hyperparameters to float32 and differs from both by up to ~1.3e-5
(relative) in the second moment. The moments and the step count stay in the optimizer's state where
torch's AdamW keeps them, so a checkpoint saved with it resumes with DeepSpeed's own step and the other way round.
Off CUDA (or without Triton) the same update runs as torch operations (torch's fused or single-tensor AdamW, as
the optimizer is): that is what the CPU tests compare with DeepSpeed's own step (tests/test_lean_zero_step.py,
tests/test_lf_train.py); tests/test_fused_zero_update_gpu.py compares the kernel with torch's AdamW on a GPU.

It applies where DeepSpeed's step would do exactly that: bf16, no CPU offload, the base optimizer torch's AdamW
(amsgrad, maximize, capturable, differentiable off), gradient norm on, no Muon, MoE or ZenFlow. Anything else
keeps DeepSpeed's own step, said once in the log.
"""

from __future__ import annotations

import functools
import math

BLOCK = 4096  # elements per Triton program


@functools.lru_cache(maxsize=1)
def _kernel():
    """The Triton kernel, or None where Triton cannot be imported."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def adamw_kernel(master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, out_ptr, coef_ptr, n, decay, beta2,
                     one_minus_beta1, one_minus_beta2, step_size, bias_correction2_sqrt, eps,
                     BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        coef = tl.load(coef_ptr)
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * coef
        master = tl.load(master_ptr + offsets, mask=mask, other=0.0)
        exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
        master = master * decay
        exp_avg = exp_avg + one_minus_beta1 * (grad - exp_avg)  # torch's lerp for a weight under 0.5
        exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * (grad * grad)
        denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
        master = master - step_size * tl.div_rn(exp_avg, denom)
        tl.store(master_ptr + offsets, master, mask=mask)
        tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)
        tl.store(out_ptr + offsets, master.to(out_ptr.dtype.element_ty), mask=mask)

    def launch(master, grad, exp_avg, exp_avg_sq, out, coef, **hyper):
        n = master.numel()
        if n == 0:  # a rank whose partition of this group is empty
            return
        adamw_kernel[(triton.cdiv(n, BLOCK),)](master, grad, exp_avg, exp_avg_sq, out, coef, n, BLOCK=BLOCK,
                                               num_warps=8, **hyper)

    return launch


def adamw_flat(master, grad, exp_avg, exp_avg_sq, out, coef, *, lr: float, beta1: float, beta2: float,
               eps: float, weight_decay: float, step: int, torch_fused: bool = False) -> None:
    """One AdamW step (torch's formula) on flat fp32 ``master`` / ``exp_avg`` / ``exp_avg_sq``, in place, with the
    flat gradient ``grad`` (any float dtype) times ``coef`` (a one-element fp32 tensor on master's device: the
    clip coefficient); the updated weights are also written, cast, into ``out``. ``step`` counts this step.
    The kernel computes as torch's single-tensor AdamW does. Without the kernel, ``torch_fused`` says which of
    torch's AdamW implementations to call: its fused one (the Trainer's default optim, adamw_torch_fused) or its
    single-tensor one, so that a CPU run reproduces DeepSpeed's step with either. Tensors that require grad
    (DeepSpeed's master weights) need the caller's torch.no_grad(), as torch's optimizers run under."""
    import torch

    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    step_size = lr / bias_correction1
    launch = _kernel() if master.is_cuda else None
    if launch is not None:
        # the hyperparameters as torch's single-tensor AdamW derives them (in double, then float32); torch's fused
        # kernel derives them in float32 (1 - beta2 = 0.00099998713), so its second moment is up to ~1.3e-5 apart
        # (relative) from this one, as from torch's own single-tensor AdamW (tests/test_fused_zero_update_gpu.py)
        launch(master, grad, exp_avg, exp_avg_sq, out, coef, decay=1 - lr * weight_decay, beta2=beta2,
               one_minus_beta1=1 - beta1, one_minus_beta2=1 - beta2, step_size=step_size,
               bias_correction2_sqrt=bias_correction2_sqrt, eps=eps)
        return
    g = grad.float().mul_(coef)  # DeepSpeed's fp32 gradient, unscaled and clipped
    if torch_fused:  # torch's fused AdamW kernel, as torch.optim.AdamW(fused=True) calls it
        steps = [torch.full((), float(step), dtype=torch.float32, device=master.device)]
        torch._fused_adamw_([master], [g], [exp_avg], [exp_avg_sq], [], steps, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
        out.copy_(master)
        return
    # torch's single-tensor AdamW, operation for operation (torch.optim.adam._single_tensor_adam)
    master.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    master.addcdiv_(exp_avg, denom, value=-step_size)
    out.copy_(master)


def why_not(opt) -> str:
    """'' where the fused update does what DeepSpeed's step would, else why not."""
    import torch

    if opt.dtype != torch.bfloat16:
        return f"the weights are {opt.dtype}, not bf16"
    if opt.cpu_offload:
        return "the optimizer is offloaded to the CPU"
    if getattr(opt, "zenflow", False) or getattr(opt, "torch_autocast_gradscaler", None) is not None:
        return "ZenFlow or torch autocast's gradient scaler is on"
    if getattr(opt, "has_moe_layers", False) or getattr(opt, "groups_lacking_loss_scale", None):
        return "MoE or Muon parameter groups"
    if not opt.compute_grad_norm:
        return "the gradient norm is off"
    base = opt.optimizer
    if type(base) is not torch.optim.AdamW:
        return f"the optimizer is {type(base).__name__}, not torch.optim.AdamW"
    for i, group in enumerate(base.param_groups):
        if group.get("amsgrad") or group.get("maximize") or group.get("capturable") or group.get("differentiable"):
            return "AdamW with amsgrad, maximize, capturable or differentiable"
        if torch.is_tensor(group["lr"]) or torch.is_tensor(group["betas"][0]):
            return "a tensor learning rate or beta"
        if len(group["params"]) != 1 or group["params"][0] is not opt.single_partition_of_fp32_groups[i]:
            return "a parameter group that is not DeepSpeed's flat fp32 partition"
    return ""


def _state(base, master, group) -> dict:
    """torch AdamW's state for ``master``, created as torch's first step would create it."""
    import torch

    state = base.state[master]
    if not state:
        on_device = group.get("fused") or group.get("capturable")
        state["step"] = (torch.zeros((), dtype=torch.float32, device=master.device) if on_device
                         else torch.tensor(0.0, dtype=torch.float32))
        state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
    return state


def _coefficient(opt, scaled_norm, invalid: bool):
    """1 / DeepSpeed's combined scale (loss scale x clip factor), as unscale_and_clip_grads computes it;
    ``invalid``: the norm is not finite (is_invalid_grad_norm, read once by the step)."""
    import torch

    combined = opt.loss_scale
    if opt.clip_grad > 0.0:
        norm = scaled_norm
        if invalid:
            norm = torch.tensor(float("inf"), dtype=torch.float, device=opt.device)
        clip = torch.clamp(((norm / opt.loss_scale) + 1e-6) / opt.clip_grad, min=1.0)
        combined = clip * opt.loss_scale
    if torch.is_tensor(combined):
        return (1.0 / combined).to(dtype=torch.float32).reshape(1)
    return torch.full((1,), 1.0 / combined, dtype=torch.float32, device=opt.device)


def install(log=print) -> None:
    import torch
    from deepspeed.runtime.utils import is_invalid_grad_norm
    from deepspeed.runtime.zero import stage_1_and_2 as zero

    Optimizer = zero.DeepSpeedZeroOptimizer
    stock_step = Optimizer.step
    told: set[str] = set()

    def step(self, closure=None):
        why = why_not(self)
        if why:
            if why not in told:
                told.add(why)
                log(f"fused ZeRO update: off ({why}); DeepSpeed's own step")
            return stock_step(self, closure)
        # DeepSpeed's step up to the update, as stock_step (no CPU offload, bf16)
        self.micro_step_id = zero.INITIAL_MICRO_STEP_ID
        self.overflow = False
        if self.check_grad_overflow:
            self.check_overflow(partition_gradients=self.partition_gradients)
        scaled_norm, invalid = None, False
        if not self.overflow:
            scaled_norm = self.scaled_global_norm()
            # one read of the norm on the host, where the overflow check or the clip coefficient needs it
            invalid = (self.check_grad_overflow or self.clip_grad > 0.0) and is_invalid_grad_norm(scaled_norm)
            if self.check_grad_overflow and invalid:
                self.overflow = True
        prev_scale = self.loss_scale
        self._update_scale(self.overflow)
        if self.overflow:
            self._global_grad_norm = float("inf")
            self.zero_grad(set_to_none=True)
            self._release_preflattened_grad_buffers()
            for k in self.averaged_gradients.keys():
                self.averaged_gradients[k] = None
                self.all_grad_tensors[k] = None
            for timer in zero.OPTIMIZER_TIMERS:
                self.timers(timer).start()
                self.timers(timer).stop()
            return
        self._global_grad_norm = scaled_norm / prev_scale
        coef = _coefficient(self, scaled_norm, invalid)
        base = self.optimizer
        for i, _ in enumerate(self.bit16_groups):
            self.timers(zero.OPTIMIZER_GRADIENTS_TIMER).start()
            partition_id = zero.dist.get_rank(group=self.real_dp_process_group[i])
            self.free_grad_in_param_list(self.params_not_in_partition[i])
            flat = self._get_preflattened_grad_partition(i)
            if flat is None:
                if partition_id == zero.dist.get_world_size(group=self.real_dp_process_group[i]) - 1:
                    flat = self.flatten_dense_tensors_aligned(self.averaged_gradients[i], int(self.partition_size[i]))
                else:
                    flat = self.flatten(self.averaged_gradients[i])
            assert flat.numel() == self.partition_size[i], (flat.numel(), self.partition_size[i])
            self.free_grad_in_param_list(self.params_in_partition[i])
            self._release_preflattened_grad_buffers(i)
            self.averaged_gradients[i] = None
            self.all_grad_tensors[i] = None
            self.timers(zero.OPTIMIZER_GRADIENTS_TIMER).stop()

            self.timers(zero.OPTIMIZER_STEP_TIMER).start()
            master = self.single_partition_of_fp32_groups[i]
            group = base.param_groups[i]
            state = _state(base, master, group)
            state["step"] += 1
            beta1, beta2 = group["betas"]
            with torch.no_grad():  # as torch's optimizers: the master weights are leaves that require grad
                adamw_flat(master, flat, state["exp_avg"], state["exp_avg_sq"],
                           self.parallel_partitioned_bit16_groups[i][partition_id], coef, lr=group["lr"],
                           beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                           step=int(state["step"]), torch_fused=bool(group.get("fused")))
            del flat
            self._lazy_init_hp_params_optimizer_state()
            self.timers(zero.OPTIMIZER_STEP_TIMER).stop()

        # DeepSpeed's step after the update, as stock_step
        self.timers(zero.OPTIMIZER_ALLGATHER_TIMER).start()
        zero.all_gather_dp_groups(groups_flat=self.bit16_groups_flat,
                                  partitioned_param_groups=self.parallel_partitioned_bit16_groups,
                                  dp_process_group=self.real_dp_process_group,
                                  start_alignment_factor=self.nccl_start_alignment_factor,
                                  allgather_bucket_size=self.allgather_bucket_size)
        self.timers(zero.OPTIMIZER_ALLGATHER_TIMER).stop()
        for i in range(len(self.bit16_groups)):
            self._update_model_bit16_weights(i)
        self.timers.log(zero.OPTIMIZER_TIMERS)

    Optimizer.step = step
    kernel = "one Triton kernel per group" if _kernel() is not None and torch.cuda.is_available() else \
        "torch operations (no Triton/CUDA here)"
    log(f"fused ZeRO update: bf16 gradient -> clip -> AdamW -> bf16 weights in one pass ({kernel})")
