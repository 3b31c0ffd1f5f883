"""speed.recompute_by_length on a GPU (pytest -m gpu, on the device machine): a bf16 Qwen2 model with SDPA on CUDA,
gradient checkpointing on as LLaMA-Factory turns it on (reentrant, and torch's non-reentrant form), gives with the
hook (sftjobs/trainer/recompute_by_length.py) the loss and gradients of every layer recomputed, within a stated
tolerance, for micro-batches that recompute none, some and all of its layers; and the peak memory grows with the
layers kept, as the memory plan's schedule assumes. The CPU tests (test_recompute_by_length.py) check the rest."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu on the device)")]

LAYERS = 6
# bf16 on the GPU: the same operations, but attention's backward and cuBLAS may add in another order from one run
# to the next, and a small tensor's gradient (a norm weight, a bias) then moves by about 1% (1x H100, 2026-12-07).
# So the whole gradient is compared (all tensors as one vector), and printed next to full recompute run twice.
TOLERANCE = 1e-2


def model_with_recompute(reentrant: bool):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=4096, hidden_size=512, intermediate_size=1536,
                                      num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=2,
                                      max_position_embeddings=8192, attn_implementation="sdpa")
    model = transformers.Qwen2ForCausalLM(config).to("cuda", torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()  # as LLaMA-Factory does before turning it on
    model.train()
    return model


def step(model, ids):
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()  # the model and the gradients kept from earlier steps
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    grads = [p.grad.float().clone() for p in model.parameters()]
    return loss.item(), grads, peak


def difference(grads, reference):
    """Relative difference of two gradients: of all tensors as one vector, and the largest of one tensor."""
    whole = (sum(((a - b).norm() ** 2 for a, b in zip(grads, reference, strict=True))) ** 0.5
             / sum(b.norm() ** 2 for b in reference) ** 0.5).item()
    largest = max(((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(grads, reference, strict=True))
    return whole, largest


@pytest.mark.parametrize("reentrant", [True, False])
def test_by_length_gives_full_recomputes_loss_and_gradients_on_the_gpu(reentrant):
    from sftjobs.trainer import recompute_by_length as rbl

    model = model_with_recompute(reentrant)
    cases = {512: 0, 2048: 3, 4096: LAYERS}  # tokens -> layers the schedule below recomputes
    schedule = [1024, 1024, 1024, 3000, 3000, 3000, 3000]
    inputs = {n: torch.randint(0, 4096, (1, n), device="cuda", generator=torch.Generator("cuda").manual_seed(n))
              for n in cases}
    full = {n: step(model, ids) for n, ids in inputs.items()}
    again = {n: step(model, ids) for n, ids in inputs.items()}  # the run-to-run spread of full recompute
    handle = rbl.attach(model, schedule, log=print)
    assert handle is not None
    peaks = {}
    for n, k in cases.items():
        assert rbl.layers_to_recompute(schedule, n) == k
        loss, grads, peaks[n] = step(model, inputs[n])
        assert [layer.gradient_checkpointing for layer in rbl.checkpointed_layers(model)] == \
            [True] * k + [False] * (LAYERS - k)
        apart, spread = difference(grads, full[n][1]), difference(again[n][1], full[n][1])
        print(f"reentrant={reentrant} tokens={n} layers recomputed={k}: loss {loss:.6f} vs {full[n][0]:.6f}; "
              f"gradient apart from full recompute: {apart[0]:.2e} whole, {apart[1]:.2e} largest for one tensor "
              f"(full recompute run twice: {spread[0]:.2e}, {spread[1]:.2e}); peak {peaks[n] / 2**20:.0f} MiB "
              f"(full recompute {full[n][2] / 2**20:.0f} MiB)")
        assert abs(loss - full[n][0]) <= 1e-3 * abs(full[n][0]) and apart[0] <= TOLERANCE
    handle.remove()
    # keeping layers' activations costs memory; recomputing all is what LLaMA-Factory does (at 512 tokens this
    # model's activations are smaller than its gradients and logits, so that case says nothing about memory)
    assert peaks[2048] > 1.5 * full[2048][2]
    assert abs(peaks[4096] - full[4096][2]) <= 0.02 * full[4096][2]
