"""Per-sample attention on a GPU: torch's flash varlen kernel against the per-sample SDPA loop.

Runs on the device machine only (`pytest -m gpu`); conftest deselects these tests where CUDA is missing, so
they are neither run nor counted there. The CPU tests (test_lf_train.py) cover the loop; this covers the one
path they cannot reach: outputs and gradients of the varlen call, and the model-level loss through the
registered attention interface.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from sftjobs.trainer.attention import per_sample as psa  # noqa: E402

pytestmark = pytest.mark.gpu

# the Qwen2.5-3B attention shape: 16 query heads, 2 KV heads, head dim 128
SHAPE = {"heads": 16, "kv_heads": 2, "dim": 128}
SEGMENTATIONS = [
    [[300, 1200, 5000, 64, 1900, 3000]],   # a fast pack: short runs (varlen calls) and long samples (SDPA calls)
    [[1, 2499, 1], [700, 1798, 3]],        # two rows, one-token empty packs and a 3-token sample
    [[100] * 30 + [1000]],                 # many short samples: one varlen call
    [[3750]],                              # one unpacked sample
]


def run(lengths_per_row, varlen: bool, seed: int = 0):
    length = sum(lengths_per_row[0])
    assert all(sum(r) == length for r in lengths_per_row)
    batch = len(lengths_per_row)
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(h):
        return torch.randn(batch, h, length, SHAPE["dim"], device="cuda", dtype=torch.bfloat16,
                           generator=gen).requires_grad_()

    q, k, v = rand(SHAPE["heads"]), rand(SHAPE["kv_heads"]), rand(SHAPE["kv_heads"])
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row]).cuda()
    weights = torch.randn(batch, length, SHAPE["heads"], SHAPE["dim"], device="cuda", generator=gen)
    kernel = psa.varlen_causal
    if not varlen:  # the reference: every sample through its own SDPA call, as where torch has no varlen kernel
        psa.varlen_causal = lambda: None
    try:
        out, _ = psa.per_sample_sdpa(None, q, k, v, None, scaling=SHAPE["dim"] ** -0.5, position_ids=position_ids)
    finally:
        psa.varlen_causal = kernel
    (out.float() * weights).sum().backward()
    return out.float(), q.grad.float(), k.grad.float(), v.grad.float()


def test_torch_has_the_varlen_kernel_here():
    assert psa.varlen_causal() is not None, f"torch {torch.__version__} has no torch.nn.attention.varlen"


@pytest.mark.parametrize("lengths", SEGMENTATIONS, ids=["mixed_pack", "two_rows", "short_pack", "single"])
def test_varlen_runs_match_the_per_sample_loop(lengths):
    fast, loop = run(lengths, varlen=True), run(lengths, varlen=False)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, loop, strict=True):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 2e-2 * scale, (name, (a - b).abs().max().item(), scale)
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9999, name


@pytest.mark.parametrize("lengths", [SEGMENTATIONS[0], SEGMENTATIONS[1], [[512, 2560]]],
                         ids=["mixed_pack", "two_rows", "bucket_multiples"])
def test_cudnn_padded_samples_match_the_per_sample_loop(lengths):
    """CUDNN_BUCKET: single samples padded to a multiple of 256 through cuDNN give the flash loop's outputs and
    gradients, and cuDNN's kernel is what ran. bucket_multiples need no padding: their output gradient reaches
    cuDNN in another layout unless grad_like_output fixes it (wrong gradients on an H100 before it did)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # the kernel training runs otherwise (launcher.setup: off cuDNN)
        loop = run(lengths, varlen=False)
    psa.CUDNN_BUCKET, psa.CUDNN_MAX_LEN = 256, 6144
    try:
        with torch.profiler.profile() as prof:
            cudnn = run(lengths, varlen=False)
    finally:
        psa.CUDNN_BUCKET, psa.CUDNN_MAX_LEN = 0, 16384
    assert any("cudnn" in e.name for e in prof.events()), sorted({e.name for e in prof.events()})[:40]
    for name, a, b in zip(("out", "dq", "dk", "dv"), cudnn, loop, strict=True):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 2e-2 * scale, (name, (a - b).abs().max().item(), scale)
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9999, name


def test_varlen_keeps_samples_apart():
    """Changing the second sample's keys must not move the first sample's output (no attention across)."""
    q = torch.randn(1, SHAPE["heads"], 1500, SHAPE["dim"], device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, SHAPE["kv_heads"], 1500, SHAPE["dim"], device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    pos = torch.cat([torch.arange(600), torch.arange(900)])[None].cuda()
    assert psa.row_pieces(psa.sample_bounds(pos, 1, 1500), q.device, True)[0][0][2] is not None  # one varlen call
    first, _ = psa.per_sample_sdpa(None, q, k, v, None, position_ids=pos)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 600:] += 5
    v2[:, :, 600:] += 5
    pos2 = pos.clone()  # a new tensor: no cached boundaries reused by identity
    second, _ = psa.per_sample_sdpa(None, q, k2, v2, None, position_ids=pos2)
    assert torch.equal(first[:, :600], second[:, :600])
    assert not torch.allclose(first[:, 600:].float(), second[:, 600:].float(), atol=1e-2)


def test_a_packed_qwen2_forward_backward_is_the_same_through_both_kernels():
    """The registered attention interface in a real (tiny) Qwen2 model: loss and gradients through the varlen
    kernel equal those through the per-sample loop."""
    from transformers import AttentionInterface, Qwen2Config, Qwen2ForCausalLM

    AttentionInterface.register(psa.NAME, psa.per_sample_sdpa)
    config = Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    config._attn_implementation = psa.NAME
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).cuda().to(torch.bfloat16)
    lengths = [700, 1, 1300, 48, 2100]
    ids = torch.randint(0, 512, (1, sum(lengths)), device="cuda")
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    labels = ids.clone()

    def loss_and_grads(varlen: bool):
        model.zero_grad()
        kernel = psa.varlen_causal
        if not varlen:
            psa.varlen_causal = lambda: None
        try:
            loss = model(input_ids=ids, position_ids=position_ids.clone(), labels=labels).loss
        finally:
            psa.varlen_causal = kernel
        loss.backward()
        return loss.item(), torch.cat([p.grad.float().flatten() for p in model.parameters()])

    (loss_v, grad_v), (loss_l, grad_l) = loss_and_grads(True), loss_and_grads(False)
    assert abs(loss_v - loss_l) < 1e-2, (loss_v, loss_l)
    assert torch.nn.functional.cosine_similarity(grad_v, grad_l, dim=0) > 0.999
