"""A sample split over a pair of ranks (speed.split_long_samples): two real processes (gloo) compute the causal
attention of their halves with split_attention, and the outputs and the query/key/value gradients are those of
the whole sample in one process; a half's row carries each target once, in the slot after its position."""

import pytest

from sftjobs.trainer.attention import split as split_attention

torch = pytest.importorskip("torch")


def test_chunks_cover_the_sample_once_and_halves_are_even():
    for length in (16, 17, 18, 19, 1000, 14981):
        halves = [split_attention.half_chunks(length, h) for h in (0, 1)]
        covered = sorted(p for chunks in halves for start, end in chunks for p in range(start, end))
        assert covered == list(range(length))
        sizes = [split_attention.half_length(length, h) for h in (0, 1)]
        assert abs(sizes[0] - sizes[1]) <= 1, (length, sizes)
        assert halves[0][0][0] == 0 and halves[0][1][1] == length  # half 0: the first and the last chunk


def test_half_rows_hold_every_target_once_in_the_next_slot():
    ids = list(range(100, 119))
    labels = [-100] * 5 + ids[5:]
    targets = {}  # sample position -> its target, read back from both halves' rows
    for half in (0, 1):
        row = split_attention.half_row(ids, labels, half)
        slots = row["labels"][1:] + [row["last_target"]]
        assert row["labels"][0] == -100
        for position, target in zip(row["position_ids"], slots, strict=True):
            assert position not in targets
            targets[position] = target
        assert [ids[p] for p in row["position_ids"]] == row["input_ids"]
    assert targets == {p: (labels[p + 1] if p + 1 < len(ids) else -100) for p in range(len(ids))}


def _pair_worker(rank, init_file, length, result_path, cuda=False):
    import torch.distributed as dist
    import torch.nn.functional as F

    if cuda:  # NCCL between two GPUs, bf16, the Qwen2.5-3B attention shape: the flash kernels
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=2)
        heads, heads_kv, dim, dtype, device = 16, 2, 128, torch.bfloat16, f"cuda:{rank}"
    else:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
        heads, heads_kv, dim, dtype, device = 4, 2, 8, torch.float64, "cpu"
    torch.manual_seed(0)
    q_all, k_all, v_all, weight = (torch.randn(*shape, dtype=dtype).to(device) for shape in (
        (1, heads, length, dim), (1, heads_kv, length, dim), (1, heads_kv, length, dim),
        (1, length, heads, dim)))  # weight: a loss that weighs every output
    positions = [p for s, e in split_attention.half_chunks(length, rank) for p in range(s, e)]
    q, k, v = (t[:, :, positions].clone().requires_grad_(True) for t in (q_all, k_all, v_all))
    group = split_attention.make_pair_groups(2)[0]
    out = split_attention.split_attention(q, k, v, split_attention.SplitHalf(length, rank, group), scaling=0.3)
    (out * weight[:, positions]).sum().backward()
    # the whole sample in this process
    qw, kw, vw = (t.clone().requires_grad_(True) for t in (q_all, k_all, v_all))
    whole = F.scaled_dot_product_attention(qw, kw, vw, is_causal=True, scale=0.3, enable_gqa=True).transpose(1, 2)
    (whole * weight).sum().backward()
    def error(a, b):  # largest difference, relative to the reference's largest value
        return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

    torch.save({"out": error(out, whole[:, positions]), "dq": error(q.grad, qw.grad[:, :, positions]),
                "dk": error(k.grad, kw.grad[:, :, positions]), "dv": error(v.grad, vw.grad[:, :, positions]),
                "grad_size": kw.grad[:, :, positions].abs().max().item()}, f"{result_path}.{rank}")
    dist.destroy_process_group()


def pair_run(tmp_path, length, cuda):
    import torch.multiprocessing as mp

    mp.spawn(_pair_worker, args=(str(tmp_path / "init"), length, str(tmp_path / "result"), cuda), nprocs=2)
    return [torch.load(tmp_path / f"result.{rank}") for rank in (0, 1)]


@pytest.mark.parametrize("length", [16, 37, 301])
def test_split_attention_over_two_processes_equals_the_whole_sample(tmp_path, length):
    for rank, result in enumerate(pair_run(tmp_path, length, cuda=False)):
        assert result["grad_size"] > 1e-3  # the gradients compared are not trivially zero
        for name in ("out", "dq", "dk", "dv"):
            assert result[name] < 1e-12, (rank, name, result)


@pytest.mark.gpu
@pytest.mark.parametrize("length", [301, 14981])
def test_split_attention_over_two_gpus_equals_the_whole_sample(tmp_path, length):
    """Two GPUs, NCCL, bf16: the flash kernels (causal aligned to the lower right for the later chunks)."""
    if torch.cuda.device_count() < 2:
        pytest.fail("needs two GPUs")
    for rank, result in enumerate(pair_run(tmp_path, length, cuda=True)):
        assert result["grad_size"] > 1e-3
        for name in ("out", "dq", "dk", "dv"):
            assert result[name] < 0.02, (rank, name, result)  # bf16 against bf16, summed in other orders


def test_splitting_needs_rank_pairs_and_no_zero3():
    from sftjobs.trainer.entry import split_off_reason

    assert split_off_reason(4, 2) is None and split_off_reason(8, 1) is None and split_off_reason(2, None) is None
    assert "3 ranks do not form pairs" in split_off_reason(3, 2)
    assert "ZeRO stage 3" in split_off_reason(4, 3)
