"""What DeepSpeed ZeRO-1's gradient hooks cost the CPU, with and without speed.zero1_gradients_in_place.

Real DeepSpeed, one rank on the CPU (gloo), bf16, ga 2, a model of 435 small parameters (as many as
Qwen2.5-3B's), the DeepSpeed config rendered from sftjobs' template with contiguous_gradients on (the default) or
off (the switch). The parameters are small so the time is DeepSpeed's and autograd's Python, not arithmetic: the
mean wall time of a backward inside the accumulation window and of the boundary's backward (which reduces), after
5 warm-up steps. Each setting runs in its own process.

    python bench/zero1_hooks_cpu.py          # both settings, one line each
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STEPS, WARM = 30, 5

CHILD = r'''
import json, sys, time
import torch, deepspeed
from sftjobs.templating import render_template
in_place, STEPS, WARM = sys.argv[1] == "1", int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
layers = []
for _ in range(145):  # 145 x (weight, bias, norm weight) = 435 parameters
    layers += [torch.nn.Linear(64, 64), torch.nn.LayerNorm(64, bias=False)]
model = torch.nn.Sequential(*layers)
config = json.loads(render_template("deepspeed.json.j2", stage=1, offload=False, gradients_in_place=in_place))
config.update({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
               "gradient_clipping": 1.0})
config["fp16"]["enabled"], config["bf16"]["enabled"] = False, True
engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                       config=config, dist_init_required=True)
x = torch.randn(4, 64).bfloat16()
inside, boundary = [], []
for step in range(STEPS):
    for micro in range(2):
        loss = engine(x).float().pow(2).mean()
        t = time.perf_counter()
        engine.backward(loss)
        (boundary if micro else inside).append(time.perf_counter() - t)
        engine.step()
mean = lambda v: sum(v[WARM:]) / len(v[WARM:]) * 1e3
print("RESULT " + json.dumps({"gradients_in_place": in_place, "parameters": sum(1 for _ in model.parameters()),
                              "hooks": len(engine.optimizer._grad_acc_hooks), "backward_ms": round(mean(inside), 1),
                              "boundary_backward_ms": round(mean(boundary), 1), "last_loss": float(loss)}))
'''


def measure(in_place: bool, port: int) -> dict:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", CHILD, "1" if in_place else "0", str(STEPS), str(WARM)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])


def main() -> None:
    for i, in_place in enumerate((False, True)):
        print(json.dumps(measure(in_place, 29691 + i)))


if __name__ == "__main__":
    main()
