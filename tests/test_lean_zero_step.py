"""The ZeRO step's speed switches under real DeepSpeed ZeRO-1 on the CPU (gloo, one rank).

speed.lean_zero_step (sftjobs/trainer/lean_zero_step.py): the same losses and gradient norms as DeepSpeed's own
step, in bf16 and fp32; a non-finite gradient still skips the step; and in bf16 DeepSpeed's per-parameter
overflow pass no longer runs.
speed.fused_zero_update (sftjobs/trainer/fused_zero_update.py, here its torch-operations path; the Triton kernel
is compared with torch's AdamW on a GPU in test_fused_zero_update_gpu.py): the same losses, norms, skipped step,
weights and optimizer state as DeepSpeed's own step, with and without the lean step, and DeepSpeed's step where it
does not apply (fp32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.train

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, os, sys
import torch, deepspeed
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

modes, dtype = sys.argv[1].split("+"), sys.argv[2]
if "lean" in modes:
    from sftjobs.trainer import lean_zero_step
    lean_zero_step.install(log=lambda m: print(m, file=sys.stderr))
if "fused" in modes:
    from sftjobs.trainer import fused_zero_update
    fused_zero_update.install(log=lambda m: print(m, file=sys.stderr))
scans = []
stock_scan = DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial
def counted(self):
    scans.append(1)
    return stock_scan(self)
DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial = counted

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                            torch.nn.Linear(64, 4))
config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 1}, "bf16": {"enabled": dtype == "bf16"}}
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=True)
data = torch.Generator().manual_seed(1)
out = {"loss": [], "norm": [], "skipped": []}
for step in range(6):
    x, y = torch.randn(8, 16, generator=data), torch.randn(8, 4, generator=data)
    if step == 3:
        x[0, 0] = float("nan")  # every gradient of this step is non-finite
    x = x.to(next(engine.module.parameters()).dtype)
    before = [p.detach().clone() for p in engine.module.parameters()]
    loss = torch.nn.functional.mse_loss(engine(x).float(), y)
    engine.backward(loss)
    engine.step()
    out["loss"].append(float(loss))
    out["norm"].append(float(engine.get_global_grad_norm()))
    out["skipped"].append(all(torch.equal(a, b) for a, b in zip(engine.module.parameters(), before)))
out["overflow_scans"] = len(scans)
out["weights"] = [float(p.double().sum()) for p in engine.module.parameters()]
base = engine.optimizer.optimizer
out["state"] = [{k: (float(v) if v.dim() == 0 else [float(v.double().sum()), float(v.double().abs().max())])
                 for k, v in sorted(base.state[p].items())} for g in base.param_groups for p in g["params"]]
out["master"] = [float(p.double().sum()) for p in engine.optimizer.single_partition_of_fp32_groups]
print("RESULT " + json.dumps(out))
'''


def run(tmp_path, mode: str, dtype: str, port: int) -> dict:
    pytest.importorskip("deepspeed")
    script = tmp_path / "zero_step.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join(
               [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, str(script), mode, dtype], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    if "lean" in mode:
        assert "lean ZeRO step:" in proc.stderr
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["log"] = proc.stderr
    return result


def same(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    finite = [(x, y) for x, y in zip(a, b, strict=True) if x == x and abs(x) != float("inf")]
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in finite) and \
        [x == x and abs(x) != float("inf") for x in a] == [y == y and abs(y) != float("inf") for y in b]


@pytest.fixture(scope="module")
def stock_run(tmp_path_factory):
    """DeepSpeed's own step, run once per dtype for every comparison in this module."""
    done: dict[str, dict] = {}

    def get(dtype: str) -> dict:
        if dtype not in done:
            done[dtype] = run(tmp_path_factory.mktemp(f"stock_{dtype}"), "stock", dtype,
                              29711 if dtype == "bf16" else 29712)
        return done[dtype]

    return get


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_lean_step_trains_as_deepspeeds_own_and_still_skips_a_nan(tmp_path, dtype, stock_run):
    stock = stock_run(dtype)
    lean = run(tmp_path, "lean", dtype, 29713 if dtype == "bf16" else 29714)
    assert lean["skipped"] == stock["skipped"] == [False, False, False, True, False, False]
    assert same(lean["loss"], stock["loss"]), (lean["loss"], stock["loss"])
    assert same(lean["norm"], stock["norm"]), (lean["norm"], stock["norm"])
    assert stock["loss"][4] != stock["loss"][2]  # the steps do train
    if dtype == "bf16":
        assert stock["overflow_scans"] == 6 and lean["overflow_scans"] == 0
    else:  # fp32: DeepSpeed has no overflow pass to skip
        assert stock["overflow_scans"] == lean["overflow_scans"] == 0


@pytest.mark.parametrize("mode", ["fused", "lean+fused"])
def test_the_fused_update_trains_as_deepspeeds_own_step(tmp_path, mode, stock_run):
    stock = stock_run("bf16")
    fused = run(tmp_path, mode, "bf16", 29716)
    assert "fused ZeRO update: bf16 gradient -> clip -> AdamW" in fused["log"] and "off (" not in fused["log"]
    assert fused["skipped"] == stock["skipped"] == [False, False, False, True, False, False]
    assert same(fused["loss"], stock["loss"]), (fused["loss"], stock["loss"])
    assert same(fused["norm"], stock["norm"]), (fused["norm"], stock["norm"])
    assert stock["loss"][4] != stock["loss"][2]  # the steps do train
    # the bf16 weights, the fp32 master weights and torch AdamW's state (step, exp_avg, exp_avg_sq) after 5 updates:
    # a checkpoint of either resumes with the other
    assert same(fused["weights"], stock["weights"]) and same(fused["master"], stock["master"])
    assert [sorted(s) for s in fused["state"]] == [sorted(s) for s in stock["state"]] == \
        [["exp_avg", "exp_avg_sq", "step"]]
    assert fused["state"][0]["step"] == stock["state"][0]["step"] == 5.0
    for key in ("exp_avg", "exp_avg_sq"):
        assert same(fused["state"][0][key], stock["state"][0][key], tol=1e-4), (key, fused["state"], stock["state"])


def test_the_fused_update_leaves_fp32_to_deepspeeds_own_step(tmp_path, stock_run):
    stock = stock_run("fp32")
    fused = run(tmp_path, "fused", "fp32", 29718)
    assert "fused ZeRO update: off (the weights are torch.float32, not bf16); DeepSpeed's own step" in fused["log"]
    assert fused["loss"] == stock["loss"] and fused["norm"] == stock["norm"] and fused["state"] == stock["state"]
