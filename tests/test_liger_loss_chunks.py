"""speed.liger_chunk_mem_const's wiring on the CPU (sftjobs/trainer/liger_loss_chunks.py): Liger's causal-LM loss,
called as the patched Qwen2 forward calls it, hands Liger's autograd function the profile's chunk_mem_const; an
explicit one still wins; installing twice wraps Liger's function once; the entry installs it from its flag; the
memory plan counts the larger chunk. Liger's Triton kernel does not run on a CPU, so its apply() is replaced by a
recorder here; tests/test_liger_loss_chunks_gpu.py runs the kernel on the device and compares the results."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("liger_kernel")

from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction  # noqa: E402
from liger_kernel.transformers import functional  # noqa: E402
from liger_kernel.transformers.model.loss_utils import LigerForCausalLMLoss  # noqa: E402

from sftjobs.planning import memory  # noqa: E402
from sftjobs.trainer import liger_loss_chunks  # noqa: E402


@pytest.fixture()
def recorded(monkeypatch):
    """The chunk_mem_const each call of Liger's autograd function gets (its last argument in liger_kernel 0.8.5)."""
    seen: list[int] = []

    def apply(*args):
        seen.append(args[-1])
        return torch.zeros(()), None, None, None

    monkeypatch.setattr(LigerFusedLinearCrossEntropyFunction, "apply", apply)
    monkeypatch.setattr(functional, "liger_fused_linear_cross_entropy", functional.liger_fused_linear_cross_entropy)
    assert LigerFusedLinearCrossEntropyFunction.supports_inner_impl_dispatch  # chunk_mem_const is passed on
    return seen


def causal_lm_loss(**kwargs):
    hidden, weight = torch.zeros(1, 6, 4), torch.zeros(10, 4)
    return LigerForCausalLMLoss(hidden, weight, torch.zeros(1, 6, dtype=torch.long), hidden_size=4, **kwargs)


def test_the_causal_lm_loss_passes_the_profiles_chunk_budget(recorded):
    causal_lm_loss()
    liger_loss_chunks.install(8)
    causal_lm_loss()
    causal_lm_loss(chunk_mem_const=2)  # a caller's own (Liger's GPT-OSS forward passes 8) still wins
    liger_loss_chunks.install(4)  # a second install replaces the first instead of wrapping it
    causal_lm_loss()
    assert recorded == [1, 8, 2, 4]
    assert functional.liger_fused_linear_cross_entropy.__wrapped__.__module__ == "liger_kernel.transformers.functional"


def test_the_budget_is_at_least_one():
    with pytest.raises(ValueError, match=">= 1"):
        liger_loss_chunks.install(0)


def test_the_entry_installs_it_from_its_flag(recorded, monkeypatch):
    from sftjobs.trainer import entry

    opts = entry.parse_args(["--liger-chunk-mem-const", "8", "train.yaml"])
    assert opts.liger_chunk_mem_const == 8 and entry.parse_args(["train.yaml"]).liger_chunk_mem_const == 0
    monkeypatch.setattr("llamafactory.train.tuner.run_exp", lambda callbacks: causal_lm_loss())
    monkeypatch.setattr("sys.argv", ["entry"])
    entry.main(["--liger-chunk-mem-const", "8", "train.yaml"])
    assert recorded == [8]


def test_the_chunk_and_its_memory_follow_the_budget():
    # Qwen2.5-3B's hidden size and vocabulary: a 7,500-token row and a 15,000-token pack
    assert [memory.liger_chunk_tokens(7500, 151936, 2048, c) for c in (1, 8)] == [128, 1024]
    assert [memory.liger_chunk_tokens(15000, 151936, 2048, c) for c in (1, 8)] == [256, 2048]
    assert memory.liger_chunk_tokens(100, 151936, 2048, 128) == 100  # never more than the tokens
    shape = memory.shape_from_table("qwen2.5-3b")
    w1 = memory.Workload(cutoff_len=15000, batch_size=1, liger=True)
    w8 = memory.Workload(cutoff_len=15000, batch_size=1, liger=True, loss_chunk_mem=8)
    grown = memory.activation_bytes(shape, w8, False)["logits"] - memory.activation_bytes(shape, w1, False)["logits"]
    assert grown == 4 * (2048 - 256) * 151936
