"""speed.torch_rms_norm on a GPU (pytest -m gpu, on the device machine): Liger's RMSNorm module switched to torch's
fused rms_norm against Liger's own Triton kernel, in bf16 at prod's hidden size: outputs and input gradients within
one bf16 rounding, the weight's gradient within bf16 summation error, both as close to the fp32 function as
Liger's; and torch's path is one kernel forward (not the composite of several elementwise ops)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("liger_kernel")

from liger_kernel.transformers.rms_norm import LigerRMSNorm  # noqa: E402

from sftjobs.trainer import patches, torch_rms_norm  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu on the device)")]

HIDDEN = 2048  # Qwen2.5-3B


def run(module, x, g):
    x = x.clone().requires_grad_(True)
    module.weight.grad = None
    y = module(x)
    y.backward(g)
    return y.detach(), x.grad.detach(), module.weight.grad.detach()


def fp32_reference(weight, x, g, eps):
    w = weight.detach().float().requires_grad_(True)
    xf = x.float().requires_grad_(True)
    y = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))
    y.backward(g.float())
    return y.detach(), xf.grad, w.grad


def test_torchs_rms_norm_matches_ligers_kernel_in_bf16():
    gen = torch.Generator(device="cuda").manual_seed(0)
    module = LigerRMSNorm(HIDDEN, eps=1e-6).cuda().to(torch.bfloat16)
    with torch.no_grad():
        module.weight.mul_(1 + 0.1 * torch.randn(HIDDEN, device="cuda", generator=gen).to(torch.bfloat16))
    x = (2 * torch.randn(8192, HIDDEN, device="cuda", generator=gen)).to(torch.bfloat16)
    g = torch.randn(8192, HIDDEN, device="cuda", generator=gen).to(torch.bfloat16)
    liger = run(module, x, g)
    saved = patches.save(["torch_rms_norm"])
    try:
        torch_rms_norm.install(log=lambda _: None)
        ours = run(module, x, g)
    finally:
        patches.restore(saved)
    exact = fp32_reference(module.weight, x, g, 1e-6)
    for name, a, b, ref in zip(("y", "dx", "dw"), ours, liger, exact, strict=True):
        scale = float(ref.abs().max())
        apart = float((a.float() - b.float()).abs().max())
        err_ours = float((a.float() - ref).abs().mean())
        err_liger = float((b.float() - ref).abs().mean())
        print(f"{name}: largest |torch - liger| {apart:.3g} (scale {scale:.3g}); mean error to fp32: torch "
              f"{err_ours:.3g}, liger {err_liger:.3g}")
        tol = 2 ** -6 if name != "dw" else 2 ** -5  # dw sums 8192 rows: each kernel's own bf16 summation order
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * scale)
        assert err_ours <= 1.25 * err_liger + 1e-6 * scale


def test_torchs_path_is_one_kernel_forward():
    module = LigerRMSNorm(HIDDEN).cuda().to(torch.bfloat16)
    x = torch.randn(4096, HIDDEN, device="cuda", dtype=torch.bfloat16)
    saved = patches.save(["torch_rms_norm"])
    try:
        torch_rms_norm.install(log=lambda _: None)
        module(x)  # warm-up
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            module(x)
            torch.cuda.synchronize()
    finally:
        patches.restore(saved)
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print("forward kernels:", kernels)
    assert len(kernels) == 1, kernels
