"""speed.liger_chunk_mem_const on a GPU (pytest -m gpu, on the device machine): Liger's fused linear cross-entropy,
called as its causal-LM loss calls it, gives the same loss, hidden-state gradient and lm_head weight gradient in 8
chunks as in its default 59 (Qwen2.5-3B's hidden size and vocabulary, a 7,500-token row in bf16), each within a
stated tolerance of an fp32 reference that materialises the whole logits; the larger chunks are no further from
that reference than the default ones. The CPU tests (test_liger_loss_chunks.py) check the wiring."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("liger_kernel")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu on the device)")]

TOKENS, HIDDEN, VOCAB = 7500, 2048, 151936


def loss_and_grads(hidden, weight, labels, chunk_mem_const=None):
    from liger_kernel.transformers import functional
    from liger_kernel.transformers.model.loss_utils import LigerForCausalLMLoss

    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    if chunk_mem_const is None:  # the reference: the whole logits in fp32
        logits = h.float() @ w.float().t()
        loss = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)
    else:
        from sftjobs.trainer import liger_loss_chunks

        saved = functional.liger_fused_linear_cross_entropy
        try:
            liger_loss_chunks.install(chunk_mem_const)
            loss = LigerForCausalLMLoss(h.unsqueeze(0), w, labels.unsqueeze(0), hidden_size=HIDDEN)
        finally:
            functional.liger_fused_linear_cross_entropy = saved
    loss.backward()
    return loss.detach().float(), h.grad.float(), w.grad.float()


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_eight_times_larger_chunks_give_the_same_loss_and_gradients():
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = (torch.randn(TOKENS, HIDDEN, device="cuda", generator=gen)).to(torch.bfloat16)
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=gen)
    labels[:300] = -100  # a prompt's tokens carry no loss
    ref = loss_and_grads(hidden, weight, labels)
    default = loss_and_grads(hidden, weight, labels, chunk_mem_const=1)
    wide = loss_and_grads(hidden, weight, labels, chunk_mem_const=8)
    errors = {}
    for name, got in (("default", default), ("wide", wide)):
        errors[name] = [abs(got[0] - ref[0]).item() / ref[0].item(), relative(got[1], ref[1]), relative(got[2], ref[2])]
    print("relative errors to fp32 (loss, dX, dW):", errors)
    # bf16 inputs and outputs: within a few bf16 roundings (2^-8 = 0.4%) of the fp32 reference
    assert all(e < 1e-2 for e in errors["wide"]), errors
    assert abs(wide[0] - default[0]).item() / default[0].item() < 1e-3
    assert relative(wide[1], default[1]) < 1e-2 and relative(wide[2], default[2]) < 1e-2
    # fewer chunks accumulate the weight gradient fewer times: not further from the reference
    assert errors["wide"][2] <= errors["default"][2] * 1.05, errors
