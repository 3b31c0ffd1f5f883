"""speed.recompute_by_length: the memory plan's schedule (sftjobs.planning.memory.recompute_schedule), its way to
the training entry, and the hook that recomputes only the first k decoder layers of each micro-batch
(sftjobs/trainer/recompute_by_length.py), on a real Qwen2 model. tests/test_lf_train.py trains with it through
LLaMA-Factory on two ranks and compares the losses and gradient norms with full recompute."""

from pathlib import Path

import pytest

from sftjobs.planning import memory
from sftjobs.profile import load_profile
from sftjobs.steps.train import training_command
from sftjobs.trainer import recompute_by_length as rbl
from sftjobs.trainer.entry import parse_args

REPO = Path(__file__).resolve().parents[1]
SHAPE_3B = memory.shape_from_table("qwen2.5-3b")
PROD_WORKLOAD = memory.Workload(cutoff_len=15000, batch_size=1, liger=True, fused_update=True, loss_chunk_mem=8)


def test_the_fewest_layers_whose_entry_holds_the_tokens():
    schedule = [100, 200, 200, 400]
    assert [rbl.layers_to_recompute(schedule, t) for t in (1, 100, 101, 200, 201, 400)] == [0, 0, 1, 1, 3, 3]
    assert rbl.layers_to_recompute(schedule, 401) == 3  # beyond every entry: all layers
    assert rbl.parse_schedule("5,6,7") == [5, 6, 7]
    for bad in ("", "5", "5,x", "5,-1"):
        with pytest.raises(ValueError, match="--recompute-by-length"):
            rbl.parse_schedule(bad)


def test_the_schedule_on_one_80_gb_gpu_runs_from_no_recompute_to_full_recompute():
    schedule = memory.recompute_schedule(SHAPE_3B, "z1", 1, PROD_WORKLOAD, 80)
    assert len(schedule) == SHAPE_3B.layers + 1
    assert schedule == sorted(schedule)  # more layers recomputed, never fewer tokens
    # entry 0 is what fits without recompute, the last what fits with every layer recomputed
    assert schedule[0] == memory._largest_cutoff_that_fits(SHAPE_3B, "z1", False, 1, PROD_WORKLOAD, 80)
    assert 5000 < schedule[0] < 7000 and schedule[-1] == 15000
    # every entry fits by the plan's own estimate, and one token more does not (below the cap)
    for k, tokens in enumerate(schedule):
        row = memory.Workload(cutoff_len=tokens, batch_size=1, liger=True, fused_update=True, loss_chunk_mem=8)
        assert memory.estimate(SHAPE_3B, "z1", True, 1, row, 80, layers_recomputed=k)["fits"]
        if tokens < 15000:
            longer = memory.Workload(cutoff_len=tokens + 1, batch_size=1, liger=True, fused_update=True,
                                     loss_chunk_mem=8)
            assert not memory.estimate(SHAPE_3B, "z1", True, 1, longer, 80, layers_recomputed=k)["fits"]


def test_partial_recompute_sits_between_none_and_all():
    acts = {k: sum(memory.activation_bytes(SHAPE_3B, PROD_WORKLOAD, True, k).values()) for k in (0, 1, 18, 35, 36)}
    assert acts[0] == sum(memory.activation_bytes(SHAPE_3B, PROD_WORKLOAD, False).values())
    assert acts[36] == sum(memory.activation_bytes(SHAPE_3B, PROD_WORKLOAD, True).values())
    assert acts[0] > acts[1] > acts[18] > acts[35]
    # recomputing the last layer too saves nothing: it is recomputed in full first thing in the backward pass
    assert acts[35] < acts[36]


def plan_of(tmp_path, name, *sets):
    from sftjobs.planning.memory import plan_memory

    profile = load_profile(name, overrides=list(sets))
    return plan_memory(profile, None)


def test_the_plan_carries_the_schedule_where_it_picks_recompute_and_the_switch_is_on(tmp_path):
    on_80 = plan_of(tmp_path, "prod", "resources.gpus_per_node=1", "batch.global_size=2", "resources.gpu_memory_gib=80",
                    "speed.recompute_by_length=true")
    assert on_80["recompute"] and len(on_80["recompute_by_tokens"]) == 37
    assert on_80["recompute_by_tokens"][0] > 5000 and "recompute by length" in on_80["reason"]
    assert "recompute by length" in memory.summary_line(on_80)
    off = plan_of(tmp_path, "prod", "resources.gpus_per_node=1", "batch.global_size=2", "resources.gpu_memory_gib=80",
                  "speed.recompute_by_length=false")
    assert off["recompute"] and off["recompute_by_tokens"] is None and "by length" not in memory.summary_line(off)
    # where the plan picks no recompute (one H200) there is nothing to schedule
    h200 = plan_of(tmp_path, "prod", "resources.gpus_per_node=1", "batch.global_size=2", "resources.gpu_memory_gib=141",
                   "speed.recompute_by_length=true")
    assert not h200["recompute"] and h200["recompute_by_tokens"] is None


def test_the_schedule_reaches_the_entry_only_with_the_switch_on():
    def entry_options(speed, schedule):
        command = training_command(Path("/r/t.yaml"), None, speed, env={}, python="/py", recompute_by_tokens=schedule)
        return vars(parse_args(command[command.index("sftjobs.trainer.entry") + 1:]))

    assert entry_options({"recompute_by_length": True}, [10, 20, 30])["recompute_by_length"] == "10,20,30"
    assert entry_options({"recompute_by_length": False}, [10, 20, 30])["recompute_by_length"] == ""
    assert entry_options({"recompute_by_length": True}, None)["recompute_by_length"] == ""


def tiny_qwen2(layers=3):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.Qwen2ForCausalLM(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return torch, model


def test_the_hook_recomputes_the_first_k_layers_and_gives_full_recomputes_gradients():
    torch, model = tiny_qwen2()
    layers = rbl.checkpointed_layers(model)
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))

    def grads(ids):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    lengths = (8, 20, 40, 70)
    inputs = {n: torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n)) for n in lengths}
    full = {n: grads(ids) for n, ids in inputs.items()}  # LLaMA-Factory's way: every layer recomputed

    lines = []
    handle = rbl.attach(model, [10, 30, 30, 50], log=lines.append)
    assert handle is not None and "on: no layer recomputed up to 10 tokens" in lines[0]
    for n, k in ((8, 0), (20, 1), (40, 3), (70, 3)):
        calls[:] = [0] * len(layers)
        by_length = grads(inputs[n])
        # a recomputed layer starts its forward again in the backward pass (torch stops it once it has what it saved)
        assert calls == [2] * k + [1] * (len(layers) - k), (n, k, calls)
        assert all(torch.equal(a, b) for a, b in zip(by_length, full[n], strict=True)), n
    assert any("3 of 3 layers recomputed for a micro-batch of 40 tokens" in line for line in lines)
    model.eval()  # outside training the hook leaves the flags alone
    [layer.__setattr__("gradient_checkpointing", True) for layer in layers]
    with torch.no_grad():
        model(input_ids=inputs[8])
    assert all(layer.gradient_checkpointing for layer in layers)
    handle.remove()


def test_the_hook_stays_off_where_the_model_does_not_match_the_schedule():
    _, model = tiny_qwen2(layers=2)
    lines = []
    assert rbl.attach(model, [10, 20, 30, 40], log=lines.append) is None
    assert "the model has 2 checkpointable layers, the memory plan's schedule 3" in lines[0]
    model.gradient_checkpointing_disable()
    assert rbl.attach(model, [10, 20, 30], log=lines.append) is None
    assert "gradient checkpointing is not on" in lines[1]


def test_the_callback_attaches_at_train_begin_and_puts_full_recompute_back_at_train_end():
    _, model = tiny_qwen2(layers=2)
    layers = rbl.checkpointed_layers(model)
    callback = rbl.callback([10, 20, 30], log=lambda _: None)
    callback.on_train_begin(None, None, None, model=model)
    model(input_ids=pytest.importorskip("torch").zeros((1, 5), dtype=int))  # 5 tokens: no layer recomputed
    assert [layer.gradient_checkpointing for layer in layers] == [False, False]
    callback.on_train_end(None, None, None, model=model)
    assert [layer.gradient_checkpointing for layer in layers] == [True, True]
    model(input_ids=pytest.importorskip("torch").zeros((1, 5), dtype=int))  # the hook is gone
    assert [layer.gradient_checkpointing for layer in layers] == [True, True]
