"""speed.fused_zero_update's Triton kernel on a GPU (pytest -m gpu, on the device machine): the same update as
torch's own AdamW (its fused kernel, the Trainer's default optim, and its single-tensor code) given the fp32
gradient DeepSpeed would hand it (the bf16 gradient
in fp32, times the clip coefficient), over several steps, and the bf16 weights written are the fp32 master's cast.
The CPU tests (test_lean_zero_step.py) run the same update through DeepSpeed's step as torch operations."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from sftjobs.trainer import fused_zero_update  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu on the device)")]

HYPER = dict(lr=7e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def reference_and_kernel(n: int, steps: int, fused: bool, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    master = torch.randn(n, device="cuda", generator=gen) * 0.02
    ref = torch.nn.Parameter(master.clone())
    opt = torch.optim.AdamW([ref], foreach=False, fused=fused, **HYPER)
    exp_avg, exp_avg_sq = torch.zeros_like(master), torch.zeros_like(master)
    out = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    for step in range(1, steps + 1):
        grad16 = (torch.randn(n, device="cuda", generator=gen) * 10 ** (step % 3 - 3)).to(torch.bfloat16)
        coef = torch.full((1,), 1 / (1 + step / 3), device="cuda")  # a clip coefficient below 1
        ref.grad = grad16.float().mul_(coef)
        opt.step()
        fused_zero_update.adamw_flat(master, grad16, exp_avg, exp_avg_sq, out, coef, lr=HYPER["lr"],
                                     beta1=HYPER["betas"][0], beta2=HYPER["betas"][1], eps=HYPER["eps"],
                                     weight_decay=HYPER["weight_decay"], step=step)
    return ref.detach(), opt.state[ref], master, exp_avg, exp_avg_sq, out


@pytest.mark.parametrize("fused", [True, False], ids=["torch_fused", "torch_single_tensor"])
def test_the_kernel_updates_as_torchs_adamw(fused):
    assert fused_zero_update._kernel() is not None
    ref, state, master, exp_avg, exp_avg_sq, out = reference_and_kernel(1_000_003, steps=5, fused=fused)
    # the single-tensor AdamW: one or two float32 roundings apart (torch's lerp and addcmul kernels round
    # differently from the kernel's arithmetic), within 1e-6 of each tensor's largest value. torch's fused AdamW
    # takes 1 - beta2 in float32 (0.00099998713, not 0.001): its second moment is 1.33e-5 (relative) apart from
    # the single-tensor one and from the kernel's (1x H100, 2026-12-06)
    for ours, theirs, apart in ((exp_avg, state["exp_avg"], 1e-6), (exp_avg_sq, state["exp_avg_sq"], 2e-5 if fused else 1e-6)):
        torch.testing.assert_close(ours, theirs, rtol=apart, atol=apart * float(theirs.abs().max()))
    torch.testing.assert_close(master, ref, rtol=1e-6, atol=1e-9)
    apart = float((master - ref).abs().max())
    print(f"largest difference from torch's AdamW after 5 steps: {apart:.3g} (one update is ~{HYPER['lr']:g})")
    assert apart < 0.01 * HYPER["lr"]  # a few float32 roundings of the weights, far below one update
    assert torch.equal(out, master.to(torch.bfloat16))


def test_the_kernel_reaches_past_two_to_the_31_elements():
    """The 3B model's partition on one GPU has ~3.1e9 elements: the kernel's offsets are 64-bit."""
    n = 2 ** 31 + 4099
    if torch.cuda.get_device_properties(0).total_memory < 60 * 2 ** 30:
        pytest.skip("needs ~40 GiB of GPU memory")
    master = torch.full((n,), 0.5, device="cuda")
    exp_avg, exp_avg_sq = torch.zeros_like(master), torch.zeros_like(master)
    grad16 = torch.full((n,), 1.0, device="cuda", dtype=torch.bfloat16)
    out = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    fused_zero_update.adamw_flat(master, grad16, exp_avg, exp_avg_sq, out, torch.ones(1, device="cuda"), lr=1e-2,
                                 beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    # step 1 of Adam moves every weight by lr * sign(grad): the last elements too
    tail = master[-5000:]
    assert torch.allclose(tail, torch.full_like(tail, 0.49), atol=1e-6)
    assert torch.equal(out[-5000:], tail.to(torch.bfloat16)) and float(exp_avg[-1]) == pytest.approx(0.1)
