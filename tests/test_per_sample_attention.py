"""speed.cudnn_attention_bucket on the CPU: the padding arithmetic and the gradient layout of causal_sdpa's cuDNN
path, run through the same code with the kernel choice left to torch (the GPU test,
test_per_sample_attention_gpu.py, runs cuDNN itself), and how lf_train sets it up."""

from __future__ import annotations

import contextlib

import pytest

torch = pytest.importorskip("torch")

from sftjobs.trainer import entry as lf_train  # noqa: E402
from sftjobs.trainer.attention import per_sample as psa  # noqa: E402


@pytest.fixture
def padded_path(monkeypatch):
    """causal_sdpa takes its cuDNN branch on the CPU: padding, warm-up and the layout fix run, SDPA's math kernel
    computes."""
    monkeypatch.setattr(psa, "on_gpu", lambda tensor: True)
    monkeypatch.setattr(psa, "cudnn_first", contextlib.nullcontext)
    monkeypatch.setattr(psa, "CUDNN_MAX_LEN", 48)
    monkeypatch.setattr(psa, "_WARMED", set())


def attend(lengths, bucket, monkeypatch):
    """One packed row of samples of these lengths through per_sample_sdpa: output and q/k/v gradients."""
    monkeypatch.setattr(psa, "CUDNN_BUCKET", bucket)
    gen = torch.Generator().manual_seed(0)
    total = sum(lengths)
    # the model's layout: [1, L, H, D] in memory, seen as [1, H, L, D]
    q, k, v = (torch.randn(1, total, h, 8, dtype=torch.float64, generator=gen).transpose(1, 2).requires_grad_()
               for h in (4, 2, 2))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    out, _ = psa.per_sample_sdpa(None, q, k, v, None, position_ids=pos)
    weights = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    (out * weights).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("lengths", [[13, 5, 30], [16, 8, 24], [1, 47]], ids=["padded", "bucket_multiples", "one"])
def test_padded_samples_give_the_unpadded_attention(lengths, padded_path, monkeypatch):
    plain = attend(lengths, 0, monkeypatch)
    padded = attend(lengths, 8, monkeypatch)
    for name, a, b in zip(("out", "dq", "dk", "dv"), padded, plain, strict=True):
        assert torch.allclose(a, b, atol=1e-12), (name, (a - b).abs().max().item())
    assert psa._WARMED, "the graphs' warm-up did not run"


def test_the_warm_up_says_what_it_built(padded_path, monkeypatch):
    said = []
    monkeypatch.setattr(psa, "LOG", said.append)
    attend([13, 5, 30], 8, monkeypatch)
    attend([13, 5, 30], 8, monkeypatch)  # once per head shape, not per forward
    assert len(said) == 1 and "6 padded lengths up to 48" in said[0], said


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_the_first_forward_may_run_without_autograd(mode, padded_path, monkeypatch):
    """An evaluation's forward can be the first: the warm-up still builds the backward's graphs, and the output
    is the unpadded attention's."""
    plain = attend([13, 5, 30], 0, monkeypatch)[0]
    monkeypatch.setattr(psa, "CUDNN_BUCKET", 8)
    gen = torch.Generator().manual_seed(0)  # attend's inputs
    q, k, v = (torch.randn(1, 48, h, 8, dtype=torch.float64, generator=gen).transpose(1, 2) for h in (4, 2, 2))
    pos = torch.cat([torch.arange(n) for n in (13, 5, 30)])[None]
    with mode():
        out, _ = psa.per_sample_sdpa(None, q, k, v, None, position_ids=pos)
    assert len(psa._WARMED) == 1
    assert torch.allclose(out, plain, atol=1e-12)


def test_padded_samples_keep_attention_inside_each_sample(padded_path, monkeypatch):
    first = attend([13, 5, 30], 8, monkeypatch)[0]
    second = attend([13, 35], 8, monkeypatch)[0]  # the same tokens, the last two samples now one
    assert torch.equal(first[:, :13], second[:, :13])
    assert not torch.allclose(first[:, 18:], second[:, 18:])


def test_the_output_gradient_reaches_the_kernel_in_the_outputs_layout():
    out = torch.randn(1, 6, 4, 8).transpose(1, 2).requires_grad_()  # [1, 4, 6, 8] in [1, 6, 4, 8] memory
    seen = {}
    def note(grad):
        seen["stride"] = grad.stride()

    out.register_hook(note)
    fixed = psa.grad_like_output()(out)
    fixed[:, :, :5].sum().backward()  # a slice's gradient comes back contiguous in [1, 4, 6, 8]
    assert seen["stride"] == out.stride()
    assert torch.equal(out.grad[:, :, :5], torch.ones(1, 4, 5, 8)) and not out.grad[:, :, 5:].any()


def test_lf_train_sets_the_bucket_and_the_longest_padded_length(tmp_path, monkeypatch):
    monkeypatch.setattr(psa, "CUDNN_BUCKET", 0)
    monkeypatch.setattr(psa, "CUDNN_MAX_LEN", 16384)
    monkeypatch.setattr(psa, "LOG", None)
    config = tmp_path / "train.yaml"
    config.write_text("cutoff_len: 15000\nstage: sft\n")
    lf_train.install_cudnn_attention(256, str(config), [])
    assert (psa.CUDNN_BUCKET, psa.CUDNN_MAX_LEN) == (256, 15000)
    lf_train.install_cudnn_attention(128, str(config), ["cutoff_len=4096"])
    assert (psa.CUDNN_BUCKET, psa.CUDNN_MAX_LEN) == (128, 4096)
    assert lf_train.parse_args(["--cudnn-attention-bucket", "256", str(config)]).cudnn_attention_bucket == 256


def packed_rows(rows, seed=0):
    """q/k/v of packed rows (each a list of sample lengths, equal totals) in the model's layout, and position ids."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(rows[0])
    q, k, v = (torch.randn(len(rows), total, h, 8, dtype=torch.float64, generator=gen).transpose(1, 2)
               for h in (4, 2, 2))
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
    return q, k, v, pos


def sliced_under_autograd(q, k, v, pos):
    """The reference: per_sample_sdpa's calls on q/k/v slices taken under autograd (each slice's backward a
    zero-filled full-size gradient, summed), as it ran before the piecewise backward."""
    import functools

    plan = psa.row_pieces(psa.sample_bounds(pos, q.shape[0], q.shape[2]), q.device, False, 0)
    call = functools.partial(psa.attend_piece, scaling=None, split=None, varlen=None)
    rows = [torch.cat([call(*(t[b:b + 1, :, p[0]:p[1]] for t in (q, k, v)), p) for p in pieces], dim=1)
            for b, pieces in enumerate(plan)]
    return torch.cat(rows, dim=0).contiguous()


def attend_rows(rows, piecewise, monkeypatch, wrap=None):
    """per_sample_sdpa's output and q/k/v gradients (piecewise), or the sliced reference's."""
    q, k, v, pos = packed_rows(rows)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # the [1, L, H, D] memory layout kept

    def attention(q, k, v):
        if not piecewise:
            return sliced_under_autograd(q, k, v, pos)
        return psa.per_sample_sdpa(None, q, k, v, None, position_ids=pos)[0]

    out = (wrap or (lambda f, *a: f(*a)))(attention, *leaves)
    weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    return out.detach(), *(t.grad for t in leaves)


@pytest.mark.parametrize("rows", [[[13, 5, 30]], [[48]], [[20, 28], [7, 7, 34]]], ids=["three", "one", "two_rows"])
def test_the_piecewise_backward_gives_what_slicing_under_autograd_gives(rows, monkeypatch):
    sliced = attend_rows(rows, False, monkeypatch)
    piecewise = attend_rows(rows, True, monkeypatch)
    for name, a, b in zip(("out", "dq", "dk", "dv"), piecewise, sliced, strict=True):
        assert torch.equal(a, b), (name, (a - b).abs().max().item())


def test_the_piecewise_backward_leaves_other_samples_gradients_alone(monkeypatch):
    """A loss on the first sample's outputs alone: no gradient on the other samples' q/k/v."""
    q, k, v, pos = packed_rows([[13, 5, 30]])
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = psa.per_sample_sdpa(None, *leaves, None, position_ids=pos)[0]
    out[:, :13].sum().backward()
    for t in leaves:
        assert t.grad[:, :, :13].abs().sum() > 0 and not t.grad[:, :, 13:].any()


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_the_piecewise_backward_under_gradient_checkpointing(reentrant, monkeypatch):
    """Recompute (LLaMA-Factory's gradient checkpointing) re-runs the forward in the backward: same gradients."""
    from torch.utils.checkpoint import checkpoint

    plain = attend_rows([[13, 5, 30]], False, monkeypatch)

    def wrap(f, *args):
        return checkpoint(f, *args, use_reentrant=reentrant)

    recomputed = attend_rows([[13, 5, 30]], True, monkeypatch, wrap)
    for name, a, b in zip(("out", "dq", "dk", "dv"), recomputed, plain, strict=True):
        assert torch.equal(a, b), (name, (a - b).abs().max().item())


def test_without_autograd_the_attention_is_not_wrapped(monkeypatch):
    q, k, v, pos = packed_rows([[13, 5, 30]])
    with torch.no_grad():
        out = psa.per_sample_sdpa(None, q, k, v, None, position_ids=pos)[0]
    assert out.grad_fn is None
    ref = attend_rows([[13, 5, 30]], False, monkeypatch)[0]
    assert torch.equal(out, ref)
