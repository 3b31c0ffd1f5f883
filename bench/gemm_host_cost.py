"""Host (CPU) cost of one GEMM launch in the 3B model's shapes, per cuBLAS backend: what the profiles' aten::mm
(48-81 us of self CPU per call on 1x H100, against ~13 us for an elementwise op) is made of.

Runs on the device: `python3 bench/gemm_host_cost.py OUT.json`. For cuBLAS and cuBLASLt
(`torch.backends.cuda.preferred_blas_library`) it times, on the CPU with no synchronisation inside the timed loop,
the GEMMs of Qwen2.5-3B's decoder layers (sftjobs' model shape table: q/k/v with bias, o, gate/up, down, each with
the backward's dX and dW products) in two patterns: `repeat`, REPEAT_LAYERS layers at a token count seen just before,
and `new`, one layer at a token count never seen (every micro-batch of a packed run has its own length). As many
elementwise adds as a `repeat` pass has GEMMs give the launch floor. A `repeat` pass stays well under the launch
queue's depth, so the CPU never waits on the GPU inside it: its GPU time, printed beside it, is far longer than its
CPU time."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sftjobs.planning.model_shapes import SYNTHETIC_SHAPES  # noqa: E402

SHAPE = SYNTHETIC_SHAPES["qwen2.5-3b"]
HIDDEN, INTER, LAYERS = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["layers"]
KV = SHAPE["kv_heads"] * HIDDEN // SHAPE["heads"]  # the K and V projections' width
REPEAT_LAYERS = 12  # a third of the stack per `repeat` pass: its launches stay well under the queue's depth
REPEAT_TOKENS = 6_279  # the `repeat` passes' and the adds' token count: P's mean tokens per step
# (in, out, bias) of each linear of a decoder layer
LINEARS = [(HIDDEN, HIDDEN, True), (HIDDEN, KV, True), (HIDDEN, KV, True), (HIDDEN, HIDDEN, False),
           (HIDDEN, INTER, False), (HIDDEN, INTER, False), (INTER, HIDDEN, False)]


def weights(device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    return [(torch.randn(out, inp, device=device, dtype=torch.bfloat16) * 0.02,
             torch.zeros(out, device=device, dtype=torch.bfloat16) if bias else None)
            for inp, out, bias in LINEARS]


def gemms(tokens: int, layers: int, params, inputs: dict[int, torch.Tensor], grads: dict[int, torch.Tensor]) -> int:
    """`layers` layers' GEMMs for `tokens` tokens: each linear's forward, its dX and its dW. Returns the count."""
    calls = 0
    for _ in range(layers):
        for (weight, bias) in params:
            x = inputs[weight.shape[1]][:tokens]
            dy = grads[weight.shape[0]][:tokens]
            torch.nn.functional.linear(x, weight, bias)
            torch.mm(dy, weight)
            torch.mm(dy.t(), x)
            calls += 3
    return calls


def add_pass(tokens: int, inputs: dict[int, torch.Tensor], count: int) -> int:
    x = inputs[HIDDEN][:tokens]
    for _ in range(count):
        torch.add(x, x)
    return count


def timed(fn, *args) -> tuple[float, float]:
    """(CPU seconds per launch of fn(*args), which returns its launch count; GPU seconds until they finished)."""
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    calls = fn(*args)
    cpu = time.perf_counter() - t0
    end.record()
    torch.cuda.synchronize()
    return cpu / calls, start.elapsed_time(end) / 1000.0


def measure(backend: str, device: torch.device, first_new_length: int, passes: int = 5) -> dict:
    torch.backends.cuda.preferred_blas_library(backend)
    params = weights(device)
    most = 15_000
    inputs = {n: torch.randn(most, n, device=device, dtype=torch.bfloat16) for n in (HIDDEN, INTER)}
    grads = {n: torch.randn(most, n, device=device, dtype=torch.bfloat16) for n in (HIDDEN, KV, INTER)}
    gemms(6_000, 1, params, inputs, grads)  # cuBLAS handles, workspaces, first heuristics
    out: dict = {"backend": str(torch.backends.cuda.preferred_blas_library())}
    # new: one layer at a length never seen, so its first GEMM of each shape meets a new token count
    for pattern, layers in (("repeat", REPEAT_LAYERS), ("new", 1)):
        cpu_us, gpu_ms = [], []
        for i in range(passes):
            tokens = REPEAT_TOKENS if pattern == "repeat" else first_new_length + 997 * i
            if pattern == "repeat":
                gemms(tokens, layers, params, inputs, grads)
            cpu, gpu = timed(gemms, tokens, layers, params, inputs, grads)
            cpu_us.append(cpu * 1e6)
            gpu_ms.append(gpu * 1e3)
        out[pattern] = {"layers": layers, "host_us_per_gemm_median": statistics.median(cpu_us),
                        "host_us_per_gemm": cpu_us, "gpu_ms_per_pass": gpu_ms}
    adds = [timed(add_pass, REPEAT_TOKENS, inputs, 3 * len(LINEARS) * REPEAT_LAYERS)[0] * 1e6 for _ in range(passes)]
    out["add_host_us_median"] = statistics.median(adds)
    return out


def main(argv: list[str]) -> int:
    device = torch.device("cuda")
    result = {"gemms_per_step": 3 * len(LINEARS) * LAYERS, "card": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "default_backend": str(torch.backends.cuda.preferred_blas_library()), "backends": []}
    for first_new_length, backend in ((4_001, "cublas"), (4_003, "cublaslt")):
        row = measure(backend, device, first_new_length)
        result["backends"].append(row)
        print(f"{row['backend']:28s} repeat {row['repeat']['host_us_per_gemm_median']:6.1f} us/GEMM, "
              f"new length {row['new']['host_us_per_gemm_median']:6.1f} us/GEMM, add {row['add_host_us_median']:5.1f} us"
              f"; GPU per pass {[round(x, 1) for x in row['repeat']['gpu_ms_per_pass']]} ms", flush=True)
    if len(argv) > 1:
        with open(argv[1], "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
