"""sftjobs' training entry (sftjobs.trainer.entry) through the real LLaMA-Factory on the CPU: the
length-balanced order, and each rank's samples packed into sample-isolated rows, train exactly the steps the
trainer's own order trains (two ranks, torchrun, gloo), and per-sample attention gives what LLaMA-Factory's 4D
block-diagonal mask gives, unlike plain packing."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from sftjobs.io import demo_assets

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def lf_setup(tmp_path_factory):
    pytest.importorskip("llamafactory")
    root = tmp_path_factory.mktemp("lf_train")
    data = demo_assets.make_synthetic_arpo(root / "base.jsonl", 200)
    model = demo_assets.make_demo_model(root / "model", data, log=lambda _: None)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for i, row in enumerate(rows):  # lengths from ~150 to ~900 tokens, so the order matters
        row["conversations"][-1]["value"] = " ".join([row["conversations"][-1]["value"]] * (1 + i % 6))
    varied = root / "varied.jsonl"
    varied.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "dataset_info.json").write_text(json.dumps({"arpo_sft_toy": {
        "file_name": str(varied), "formatting": "sharegpt", "columns": {"messages": "conversations", "system": "system"}}}))
    (root / "train.yaml").write_text(textwrap.dedent(f"""\
        model_name_or_path: {model}
        stage: sft
        do_train: true
        finetuning_type: full
        dataset_dir: {root}
        dataset: arpo_sft_toy
        template: qwen
        cutoff_len: 1024
        max_samples: 200
        preprocessing_num_workers: 1
        logging_steps: 1
        save_steps: 1000
        per_device_train_batch_size: 1
        gradient_accumulation_steps: 2
        learning_rate: 5.0e-3
        max_steps: 6
        lr_scheduler_type: constant
        bf16: false
        use_cpu: true
        report_to: none
        """))
    return root


def train(root, name, *args, ranks=1, port=29641):
    entry = [sys.executable, "-m", "sftjobs.trainer.entry", *[a for a in args if a.startswith("--")],
             str(root / "train.yaml"), f"output_dir={root / name}", *[a for a in args if not a.startswith("--")]]
    if ranks > 1:
        entry[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "WANDB_DISABLED": "true"}
    proc = subprocess.run(entry, capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return logged(root, name, "loss"), proc.stderr


def logged(root, name, key):
    """One value per logging step: from the run's trainer_log.jsonl (loss, lr, ...), else from the log history
    of its trainer_state.json (grad_norm, which LLaMA-Factory's trainer_log.jsonl leaves out)."""
    lines = (root / name / "trainer_log.jsonl").read_text().splitlines()
    values = [r[key] for r in map(json.loads, lines) if key in r]
    if values:
        return values
    history = json.loads((root / name / "trainer_state.json").read_text())["log_history"]
    return [r[key] for r in history if key in r]


def logged_pack_summary(err):
    """The packer's summary line (rank_balance.pack_summary) from a run's stderr."""
    found = re.search(r"\[sftjobs train\] pack rank samples: (\{.*?\})", err)
    assert found, err[-3000:]
    return json.loads(found.group(1))


def close(a, b, tol=1e-4):
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b, strict=True))


def test_balanced_order_trains_the_same_steps_on_two_ranks(lf_setup):
    plain, _ = train(lf_setup, "plain", ranks=2, port=29641)
    balanced, err = train(lf_setup, "balanced", "--balance-ranks", ranks=2, port=29642)
    reseeded, _ = train(lf_setup, "reseeded", "seed=7", ranks=2, port=29643)
    assert len(plain) == 6
    assert close(balanced, plain), (balanced, plain)  # same samples per step -> same updates, same losses
    assert not close(reseeded, plain)                 # other steps do show up in these losses
    found = re.search(r"\[sftjobs train\] balance ranks: (\{.*?\})", err)  # tqdm may share its line
    assert found, err[-3000:]
    summary = json.loads(found.group(1))
    # no DeepSpeed: one gradient sync per step, so the slowest rank's token total is what is balanced
    assert "layout ranks" in err
    assert summary["max_rank_tokens_after"] < 0.95 * summary["max_rank_tokens_before"], summary


def test_packed_rank_samples_train_the_same_steps_on_two_ranks(lf_setup):
    """Each rank's samples of a step packed into sample-isolated rows, some rows empty: same losses and gradient
    norms as the plain order (same samples per step, the loss normalised by the step's supervised tokens)."""
    plain, _ = train(lf_setup, "plain_g", "gradient_accumulation_steps=4", ranks=2, port=29644)
    packed, err = train(lf_setup, "packed_g", "--pack-rank-samples", "gradient_accumulation_steps=4", ranks=2,
                        port=29645)
    assert len(plain) == 6
    assert close(packed, plain), (packed, plain)
    norms = [logged(lf_setup, n, "grad_norm") for n in ("plain_g", "packed_g")]
    assert close(norms[1], norms[0]), norms
    summary = logged_pack_summary(err)
    assert summary["empty_packs_per_step"] > 0, summary   # samples really shared rows
    assert summary["idle_micro_steps_per_step"] > 0, summary   # micro-steps with nothing on either rank
    assert summary["slowest_over_mean_after"] < summary["slowest_over_mean_before"], summary
    # the same run with those micro-steps skipped (no forward, no backward) trains the same steps
    skipped, err = train(lf_setup, "packed_skip", "--pack-rank-samples", "--skip-idle-micro-steps",
                         "gradient_accumulation_steps=4", ranks=2, port=29646)
    assert "skip idle micro-steps: a micro-step with nothing to compute on any GPU was skipped" in err
    assert close(skipped, plain), (skipped, plain)
    skip_norms = logged(lf_setup, "packed_skip", "grad_norm")
    assert close(skip_norms, norms[0]), (skip_norms, norms[0])


def test_skipped_idle_micro_steps_train_the_same_steps_under_deepspeed_zero2(lf_setup):
    """Real DeepSpeed ZeRO-2 (sftjobs' own template; gloo on the CPU): gradients are reduce-scattered in every
    micro-step's backward and DeepSpeed is told the accumulation boundary by accelerate. Skipping the micro-steps
    that are idle on both ranks gives the losses and gradient norms of the plain order."""
    from sftjobs.templating import render_template

    ds = lf_setup / "ds_z2.json"
    ds.write_text(render_template("deepspeed.json.j2", stage=2, offload=False))
    common = ["gradient_accumulation_steps=4", f"deepspeed={ds}"]
    plain, _ = train(lf_setup, "z2_plain", *common, ranks=2, port=29647)
    skipped, err = train(lf_setup, "z2_skip", "--pack-rank-samples", "--skip-idle-micro-steps", *common, ranks=2,
                         port=29648)
    assert "layout rounds (ZeRO stage 2)" in err  # DeepSpeed really ran, at stage 2
    assert "skip idle micro-steps: a micro-step with nothing to compute on any GPU was skipped" in err
    assert len(plain) == 6 and close(skipped, plain), (skipped, plain)
    norms = [logged(lf_setup, n, "grad_norm") for n in ("z2_plain", "z2_skip")]
    assert close(norms[1], norms[0]), norms


def test_long_samples_split_over_a_rank_pair_train_the_same_steps(lf_setup):
    """A step's longest sample split over the two ranks (half each, attention across the pair): the losses and
    gradient norms of the plain order, without DeepSpeed and under real DeepSpeed ZeRO-2 (gloo on the CPU).
    One sample per rank and step (ga 1), so that most steps have a sample to split."""
    from sftjobs.templating import render_template

    plain, _ = train(lf_setup, "plain_s", "gradient_accumulation_steps=1", ranks=2, port=29649)
    split, err = train(lf_setup, "split", "--pack-rank-samples", "--split-long-samples",
                       "gradient_accumulation_steps=1", ranks=2, port=29650)
    assert "split long samples: 1 rank pair(s)" in err
    assert re.search(r"split long samples: a \d+-token sample ran split over ranks 0 and 1", err), err[-3000:]
    summary = logged_pack_summary(err)
    assert summary["split_samples_per_step"] > 0, summary
    assert len(plain) == 6 and close(split, plain), (split, plain)
    norms = [logged(lf_setup, n, "grad_norm") for n in ("plain_s", "split")]
    assert close(norms[1], norms[0]), norms
    ds = lf_setup / "ds_z2s.json"
    ds.write_text(render_template("deepspeed.json.j2", stage=2, offload=False))
    z2_plain, _ = train(lf_setup, "z2s_plain", "gradient_accumulation_steps=1", f"deepspeed={ds}", ranks=2,
                        port=29651)
    z2_split, err = train(lf_setup, "z2s_split", "--pack-rank-samples", "--split-long-samples",
                          "gradient_accumulation_steps=1", f"deepspeed={ds}", ranks=2, port=29652)
    assert "layout rounds (ZeRO stage 2)" in err and "ran split over ranks 0 and 1" in err
    assert close(z2_split, z2_plain), (z2_split, z2_plain)
    norms = [logged(lf_setup, n, "grad_norm") for n in ("z2s_plain", "z2s_split")]
    assert close(norms[1], norms[0]), norms


def test_per_sample_attention_matches_the_block_diagonal_mask(lf_setup):
    packed = ["packing=true", "cutoff_len=2048", "gradient_accumulation_steps=1", "max_steps=4"]
    mask, _ = train(lf_setup, "neat_mask", *packed, "neat_packing=true", f"tokenized_path={lf_setup / 'tok_neat'}")
    per_sample, err = train(lf_setup, "neat_per_sample", "--per-sample-attention", *packed, "neat_packing=true",
                            f"tokenized_path={lf_setup / 'tok_neat'}")
    crossing, _ = train(lf_setup, "plain_packing", *packed, "neat_packing=false", f"tokenized_path={lf_setup / 'tok_plain'}")
    assert "registered sftjobs_per_sample_sdpa" in err
    assert close(per_sample, mask), (per_sample, mask)
    assert not close(crossing, mask, tol=1e-3)  # attention across samples is measurably different


def test_per_sample_sdpa_equals_a_block_diagonal_causal_mask():
    torch = pytest.importorskip("torch")
    from sftjobs.trainer.attention.per_sample import per_sample_sdpa, sample_bounds

    torch.manual_seed(0)
    lengths = [5, 9, 3, 7]
    total = sum(lengths)
    q = torch.randn(1, 4, total, 8)
    k, v = torch.randn(1, 2, total, 8), torch.randn(1, 2, total, 8)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    assert sample_bounds(position_ids, 1, total) == [[0, 5, 14, 17, 24]]
    out, _ = per_sample_sdpa(None, q, k, v, None, position_ids=position_ids)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (segment[:, None] == segment[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           attn_mask=allowed[None, None])
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-5)
    crossing = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                                is_causal=True)
    assert not torch.allclose(out, crossing.transpose(1, 2), atol=1e-3)


def test_varlen_binding_follows_torchs_spelling_of_causal():
    torch = pytest.importorskip("torch")
    from sftjobs.trainer.attention.per_sample import bind_causal

    def new_api(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        return window_size

    def preview_api(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):  # no scale keyword
        return q, is_causal

    def unknown_api(q, k, v, cu_q, cu_k, max_q, max_k):
        return None

    assert bind_causal(new_api)(*range(7), scale=0.5) == (-1, 0)
    q = torch.ones(2, 3, 16)
    assert bind_causal(preview_api)(q, *range(6), scale=0.25) == (q, True)  # 16 ** -0.5: the kernel's own
    folded, causal = bind_causal(preview_api)(q, *range(6), scale=0.5)
    assert causal is True and torch.equal(folded, q * 2)  # softmax(q k * 0.25 * 2) = softmax(q k * 0.5)
    assert bind_causal(unknown_api) is None


def test_short_samples_in_runs_share_one_varlen_call_and_long_ones_get_sdpa():
    pytest.importorskip("torch")
    from sftjobs.trainer.attention.per_sample import SHORT_SAMPLE, row_pieces

    long = SHORT_SAMPLE + 10
    lengths = [100, 200, long, 50, long, 30, 40, 60]
    row = [0]
    for n in lengths:
        row.append(row[-1] + n)
    pieces = row_pieces([row], "cpu", True)[0]
    calls = [(s, e, None if cu is None else cu.tolist(), longest) for s, e, cu, longest in pieces]
    b = 300 + long
    assert calls == [(0, 300, [0, 100, 300], 200), (300, b, None, 0), (b, b + 50, None, 0),  # a run of one: SDPA
                     (b + 50, b + 50 + long, None, 0), (b + 50 + long, row[-1], [0, 30, 70, 130], 60)]
    assert all(cu is None for _, _, cu, _ in row_pieces([row], "cpu", False)[0])  # no varlen: SDPA per sample
    assert len(row_pieces([row], "cpu", False)[0]) == len(lengths)


def test_the_entry_trains_as_llamafactory_cli_does(lf_setup):
    """Same YAML, stock `llamafactory-cli train` vs sftjobs' entry (which leaves one-row batches unpadded, so
    SDPA gets no mask): the same losses."""
    import shutil
    from pathlib import Path

    cli = shutil.which("llamafactory-cli") or str(Path(sys.executable).parent / "llamafactory-cli")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "WANDB_DISABLED": "true"}
    proc = subprocess.run([cli, "train", str(lf_setup / "train.yaml"), f"output_dir={lf_setup / 'stock'}"],
                          capture_output=True, text=True, env=env, cwd=lf_setup, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = [json.loads(line)["loss"] for line in (lf_setup / "stock" / "trainer_log.jsonl").read_text().splitlines()
             if '"loss"' in line]
    ours, _ = train(lf_setup, "entry")
    assert len(stock) == 6 and close(ours, stock), (ours, stock)


def test_one_row_batches_reach_sdpa_without_a_mask(lf_setup):
    """LLaMA-Factory pads every batch to a multiple of 8; for one row that forces an L x L mask (and SDPA's
    memory-efficient kernel on GPUs). The entry's collator leaves the row unpadded, so transformers drops the mask."""
    torch = pytest.importorskip("torch")
    from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask
    from llamafactory.data.template import TEMPLATES
    from transformers import AutoTokenizer

    from sftjobs.trainer.entry import install_unpadded_single_rows

    tokenizer = AutoTokenizer.from_pretrained(lf_setup / "model")
    features = [{"input_ids": list(range(5, 18)), "attention_mask": [1] * 13, "labels": list(range(5, 18))}]
    collate = SFTDataCollatorWith4DAttentionMask(tokenizer=tokenizer, template=TEMPLATES["qwen"], pad_to_multiple_of=8,
                                                 label_pad_token_id=-100, compute_dtype=torch.float32)
    padded = collate([dict(f) for f in features])
    assert padded["input_ids"].shape[1] == 16 and not bool(padded["attention_mask"].all())
    original = SFTDataCollatorWith4DAttentionMask.__call__
    try:
        install_unpadded_single_rows()
        one = collate([dict(f) for f in features])
        assert one["input_ids"].shape[1] == 13 and bool(one["attention_mask"].all())
        two = collate([dict(f) for f in features] * 2)  # a real batch still pads as LLaMA-Factory does
        assert two["input_ids"].shape[1] == 16
    finally:
        SFTDataCollatorWith4DAttentionMask.__call__ = original


def test_the_benchmark_times_the_entry_through_its_callback_hook(lf_setup):
    """bench/bench_prod.sh runs this entry with `--callback bench.step_timer:callbacks`: one record per optimizer
    step, with the tokens so far, what bench/summarize_prod.py reads (its phases need CUDA events: empty here)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = lf_setup / "timer"
    out.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "WANDB_DISABLED": "true",
           "BENCH_OUT": str(out), "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "sftjobs.trainer.entry", "--callback", "bench.step_timer:callbacks",
                           str(lf_setup / "train.yaml"), f"output_dir={lf_setup / 'timed'}",
                           "include_num_input_tokens_seen=non_padding"],
                          capture_output=True, text=True, env=env, cwd=lf_setup, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "callback bench.step_timer:callbacks: StepTimer" in proc.stderr
    rec = json.loads((out / "timing_rank0.json").read_text())
    assert rec["steps"] == [1, 2, 3, 4, 5, 6] and rec["world_size"] == 1
    assert all(b > a for a, b in zip(rec["t"], rec["t"][1:], strict=False))
    assert 0 < rec["tokens"][0] < rec["tokens"][-1] <= rec["all_tokens"][-1]
    assert len(rec["phases"]) == 6
    assert len(logged(lf_setup, "timed", "loss")) == 6


def test_the_lean_zero_step_trains_the_plain_steps_under_zero_1_and_2(lf_setup):
    """speed.lean_zero_step under real DeepSpeed ZeRO-1 and ZeRO-2 (sftjobs' own template; gloo on the CPU, two
    ranks): the losses and gradient norms of DeepSpeed's own step (tests/test_lean_zero_step.py has bf16's part)."""
    from sftjobs.templating import render_template

    for stage, port in ((1, 29653), (2, 29655)):
        ds = lf_setup / f"ds_lean_z{stage}.json"
        ds.write_text(render_template("deepspeed.json.j2", stage=stage, offload=False))
        plain, _ = train(lf_setup, f"z{stage}_stock", f"deepspeed={ds}", ranks=2, port=port)
        lean, err = train(lf_setup, f"z{stage}_lean", "--lean-zero-step", f"deepspeed={ds}", ranks=2, port=port + 1)
        assert "lean ZeRO step: one multi-tensor gradient norm" in err
        assert len(plain) == 6 and close(lean, plain), (stage, lean, plain)
        norms = [logged(lf_setup, n, "grad_norm") for n in (f"z{stage}_stock", f"z{stage}_lean")]
        assert len(norms[0]) == 6 and close(norms[1], norms[0]), (stage, norms)


def test_the_fused_zero_update_trains_the_plain_steps_in_bf16_under_zero_1_and_2(lf_setup):
    """speed.fused_zero_update under real DeepSpeed ZeRO-1 and ZeRO-2 in bf16 through LLaMA-Factory (gloo on the
    CPU, two ranks, each updating its own partition; the update as torch operations, the kernel is compared with
    torch's AdamW in tests/test_fused_zero_update_gpu.py): the losses and gradient norms of DeepSpeed's own step.

    (speed.lean_zero_step in bf16 is not bit-equal to DeepSpeed's step: its norm sums in fp32, not fp64, so the clip
    coefficient differs in the 7th digit and, through the bf16 weights, the norms of later steps by up to ~0.4% here;
    that is why the fused update is compared alone.)"""
    from sftjobs.templating import render_template

    for stage, port in ((1, 29657), (2, 29659)):
        ds = lf_setup / f"ds_fused_z{stage}.json"
        ds.write_text(render_template("deepspeed.json.j2", stage=stage, offload=False))
        plain, _ = train(lf_setup, f"z{stage}_bf16", f"deepspeed={ds}", "bf16=true", ranks=2, port=port)
        fused, err = train(lf_setup, f"z{stage}_bf16_fused", "--fused-zero-update", f"deepspeed={ds}", "bf16=true",
                           ranks=2, port=port + 1)
        assert "fused ZeRO update: bf16 gradient -> clip -> AdamW -> bf16 weights" in err and "off (" not in err
        assert len(plain) == 6 and plain[-1] < plain[0] and close(fused, plain, tol=1e-6), (stage, fused, plain)
        norms = [logged(lf_setup, n, "grad_norm") for n in (f"z{stage}_bf16", f"z{stage}_bf16_fused")]
        assert len(norms[0]) == 6 and close(norms[1], norms[0], tol=1e-6), (stage, norms)


def test_zero1_gradients_in_place_train_the_same_steps(lf_setup):
    """speed.zero1_gradients_in_place (contiguous_gradients off at ZeRO-1: sftjobs' template) under real DeepSpeed
    through LLaMA-Factory (gloo on the CPU, two ranks, two micro-steps a step): the losses and gradient norms of the
    contiguous bucket, in bf16 with prod's lean step and fused update (fp32 gave the same equality; one dtype keeps
    the tier's time down)."""
    from sftjobs.templating import render_template

    losses, norms = {}, {}
    for in_place, name, port in ((False, "z1_bf16_contiguous", 29663), (True, "z1_bf16_in_place", 29664)):
        ds = lf_setup / f"ds_{name}.json"
        ds.write_text(render_template("deepspeed.json.j2", stage=1, offload=False, gradients_in_place=in_place))
        assert json.loads(ds.read_text())["zero_optimization"]["contiguous_gradients"] is (not in_place)
        losses[in_place], _ = train(lf_setup, name, "--lean-zero-step", "--fused-zero-update", f"deepspeed={ds}",
                                    "bf16=true", ranks=2, port=port)
        norms[in_place] = logged(lf_setup, name, "grad_norm")
    assert len(losses[False]) == 6 and losses[False][-1] < losses[False][0], losses
    assert close(losses[True], losses[False], tol=1e-6), losses
    assert len(norms[False]) == 6 and close(norms[True], norms[False], tol=1e-6), norms


def test_recompute_by_length_trains_the_steps_of_full_recompute(lf_setup):
    """speed.recompute_by_length under real DeepSpeed ZeRO-1 in bf16 with prod's lean step and fused update, through
    LLaMA-Factory (gloo on the CPU, two ranks): micro-batches of ~150-900 tokens against a schedule that recomputes
    none, one or both of the model's two layers by length train with the losses and gradient norms of LLaMA-Factory's
    recompute of every layer."""
    from sftjobs.templating import render_template

    ds = lf_setup / "ds_rbl_z1.json"
    ds.write_text(render_template("deepspeed.json.j2", stage=1, offload=False))
    common = ("--lean-zero-step", "--fused-zero-update", f"deepspeed={ds}", "bf16=true")
    full, _ = train(lf_setup, "z1_bf16_full_recompute", *common, ranks=2, port=29667)
    by_length, err = train(lf_setup, "z1_bf16_by_length", "--recompute-by-length=150,300,100000", *common,
                           ranks=2, port=29668)
    assert "speed.recompute_by_length on: no layer recomputed up to 150 tokens" in err, err[-3000:]
    used = {int(k) for k in re.findall(r"recompute_by_length: (\d) of 2 layers recomputed", err)}
    assert used == {0, 1, 2}, re.findall(r"recompute_by_length: .*", err)  # the schedule's three cases all ran (rank 0's micro-batches)
    assert len(full) == 6 and full[-1] < full[0] and close(by_length, full, tol=1e-6), (by_length, full)
    norms = [logged(lf_setup, n, "grad_norm") for n in ("z1_bf16_full_recompute", "z1_bf16_by_length")]
    assert len(norms[0]) == 6 and close(norms[1], norms[0], tol=1e-6), norms
