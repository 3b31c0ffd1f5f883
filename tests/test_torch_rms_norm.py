"""speed.torch_rms_norm (sftjobs/trainer/torch_rms_norm.py) on the CPU: Liger's RMSNorm module, switched to torch's
rms_norm, computes what transformers' Qwen2RMSNorm computes (the function Liger's "llama" casting mode reproduces):
the same values and gradients in fp32, within one bf16 rounding in bf16; a whole tiny Qwen2 model built with it
has the stock model's loss and gradients. Modules of another kind keep Liger's forward; the patch is undone by
patches.restore and turns off where liger-kernel is not the verified version. Against Liger's own Triton kernel on
a GPU: test_torch_rms_norm_gpu.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("liger_kernel")
pytest.importorskip("transformers")

from liger_kernel.transformers.rms_norm import LigerRMSNorm, LigerRMSNormForGemma  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm  # noqa: E402

from sftjobs.trainer import patches, torch_rms_norm  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.test_patches import no_imports, simulate  # noqa: E402

pytestmark = pytest.mark.train


@pytest.fixture
def installed():
    saved = patches.save(["torch_rms_norm"])
    torch_rms_norm.install(log=lambda _: None)
    yield
    patches.restore(saved)


def pair(dtype, hidden=64, eps=1e-6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    ours, stock = LigerRMSNorm(hidden, eps=eps), Qwen2RMSNorm(hidden, eps=eps)
    with torch.no_grad():
        ours.weight.copy_(weight)
        stock.weight.copy_(weight)
    x = (3 * torch.randn(2, 37, hidden, generator=gen)).to(dtype)
    return ours.to(dtype), stock.to(dtype), x


def forward_backward(module, x, seed=1):
    x = x.clone().requires_grad_(True)
    y = module(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    y.backward(g)
    return y.detach(), x.grad, module.weight.grad


def test_in_fp32_the_switched_liger_module_is_qwen2s_rmsnorm(installed):
    ours, stock, x = pair(torch.float32)
    for a, b in zip(forward_backward(ours, x), forward_backward(stock, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_in_bf16_it_is_within_one_rounding_of_qwen2s_rmsnorm(installed):
    """Qwen2RMSNorm rounds the normalised value to bf16 before the weight and again after; torch's kernel rounds
    once: apart by at most ~one bf16 step (2^-8 relative) of the output, and as far in the gradients."""
    ours, stock, x = pair(torch.bfloat16)
    y_ours, dx_ours, dw_ours = forward_backward(ours, x)
    y_stock, dx_stock, dw_stock = forward_backward(stock, x)
    assert y_ours.dtype == torch.bfloat16 and dx_ours.dtype == torch.bfloat16
    torch.testing.assert_close(y_ours.float(), y_stock.float(), rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(dx_ours.float(), dx_stock.float(), rtol=2 ** -6, atol=2 ** -6 * float(dx_stock.abs().max()))
    torch.testing.assert_close(dw_ours.float(), dw_stock.float(), rtol=2 ** -5, atol=2 ** -6 * float(dw_stock.abs().max()))
    # and closer to the fp32 function than the double-rounded one is, or as close
    y_exact = forward_backward(stock.float(), x.float())[0]
    assert (y_ours.float() - y_exact).abs().mean() <= (y_stock.float() - y_exact).abs().mean()


def test_other_kinds_of_liger_rmsnorm_keep_ligers_forward(monkeypatch):
    calls = []
    monkeypatch.setattr(LigerRMSNorm, "forward", lambda self, x: calls.append(type(self).__name__) or x)
    saved = patches.save(["torch_rms_norm"])
    try:
        torch_rms_norm.install(log=lambda _: None)
        gemma = LigerRMSNormForGemma(8)  # offset 1, gemma casting: (1 + w) * x, not torch's rms_norm
        other = LigerRMSNorm(8, casting_mode="none")
        assert not torch_rms_norm.applies(gemma) and not torch_rms_norm.applies(other)
        x = torch.randn(3, 8)
        assert gemma(x) is x and other(x) is x
        assert calls == ["LigerRMSNormForGemma", "LigerRMSNorm"]
        qwen = LigerRMSNorm(8)
        assert torch_rms_norm.applies(qwen) and qwen(x) is not x and calls == ["LigerRMSNormForGemma", "LigerRMSNorm"]
        mixed = x.to(torch.bfloat16)  # an fp32 weight under a bf16 input: torch's kernel would not be the fused one
        assert qwen(mixed) is mixed and calls == ["LigerRMSNormForGemma", "LigerRMSNorm", "LigerRMSNorm"]
    finally:
        patches.restore(saved)


def test_restore_undoes_the_install():
    before = LigerRMSNorm.forward
    saved = patches.save(["torch_rms_norm"])
    torch_rms_norm.install(log=lambda _: None)
    assert LigerRMSNorm.forward is not before
    patches.restore(saved)
    assert LigerRMSNorm.forward is before


def test_it_turns_off_on_an_unverified_liger_kernel(monkeypatch):
    simulate(monkeypatch, liger_kernel="0.9.0")
    no_imports(monkeypatch)
    lines = []
    decision = patches.decide(["speed.torch_rms_norm"], log=lines.append)["speed.torch_rms_norm"]
    assert not decision.on and lines == [decision.line()]
    assert lines[0].startswith("speed.torch_rms_norm off: liger_kernel 0.9.0 not verified")
    assert patches.FEATURES["speed.torch_rms_norm"].cost in lines[0]


WHOLE_MODEL = textwrap.dedent("""
    import json, sys, torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    switched = sys.argv[1] == "switched"
    if switched:  # as LLaMA-Factory's enable_liger_kernel does, RMSNorm only (Liger's other kernels need a GPU)
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2
        apply_liger_kernel_to_qwen2(rope=False, swiglu=False, cross_entropy=False, fused_linear_cross_entropy=False,
                                    rms_norm=True)
        from sftjobs.trainer import torch_rms_norm
        torch_rms_norm.install(log=lambda _: None)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg).float()
    norms = sorted({type(m).__name__ for m in model.modules() if "RMSNorm" in type(m).__name__})
    with torch.no_grad():  # RMSNorm weights away from their initial ones
        for m in model.modules():
            if "RMSNorm" in type(m).__name__:
                m.weight.mul_(1 + 0.1 * torch.randn_like(m.weight))
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.norm().item() for n, p in model.named_parameters()}
    print(json.dumps({"norms": norms, "loss": loss.item(), "grads": grads}))
""")


def test_a_tiny_qwen2_with_it_has_the_stock_models_loss_and_gradients(tmp_path):
    """Each run in its own process: Liger's patch replaces transformers' Qwen2RMSNorm class for the process."""
    def run(kind):
        out = subprocess.run([sys.executable, "-c", WHOLE_MODEL, kind], capture_output=True, text=True, check=True,
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
        return json.loads(out.stdout.strip().splitlines()[-1])

    stock, switched = run("stock"), run("switched")
    assert stock["norms"] == ["Qwen2RMSNorm"] and switched["norms"] == ["LigerRMSNorm"]
    assert switched["loss"] == pytest.approx(stock["loss"], rel=1e-6)
    assert switched["grads"].keys() == stock["grads"].keys()
    for name, norm in stock["grads"].items():
        assert switched["grads"][name] == pytest.approx(norm, rel=1e-5, abs=1e-9), name
