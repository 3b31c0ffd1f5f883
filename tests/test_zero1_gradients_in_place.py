"""speed.zero1_gradients_in_place: the rendered DeepSpeed config and what real DeepSpeed does with it.

At ZeRO-1 the profile key turns contiguous_gradients off (templates/deepspeed.json.j2), and DeepSpeed 0.19.8 then
registers no hook on the parameters' gradients (with it on, one per parameter, run in every backward only to copy
the gradient into the contiguous bucket); stage 2 keeps contiguous_gradients and its hooks whatever the key says.
The same losses and gradient norms through LLaMA-Factory on two ranks: tests/test_lf_train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sftjobs.planning.dag import build_plan
from sftjobs.planning.run import plan_run
from sftjobs.profile import load_profile
from sftjobs.render import render_files
from sftjobs.templating import render_template


@pytest.mark.parametrize("stage, in_place, contiguous", [(1, True, False), (1, False, True), (2, True, True),
                                                         (2, False, True), (3, True, True)])
def test_the_template_turns_contiguous_gradients_off_at_stage_1_only(stage, in_place, contiguous):
    config = json.loads(render_template("deepspeed.json.j2", stage=stage, offload=False, gradients_in_place=in_place))
    assert config["zero_optimization"]["contiguous_gradients"] is contiguous


def test_the_profile_key_reaches_the_rendered_config():
    for name, sets, expected in (("prod", ["deepspeed=z1"], True), ("toy", ["deepspeed=z1"], True),
                                 ("prod", ["deepspeed=z1", "speed.zero1_gradients_in_place=true"], False),
                                 ("prod", ["deepspeed=z2", "speed.zero1_gradients_in_place=true"], True)):
        profile = load_profile(name, sets)
        files = render_files(plan_run(profile, build_plan(profile), Path("/RUN"), "r", base=Path("/BASE")))
        config = json.loads(files["deepspeed.json"])
        assert config["zero_optimization"]["contiguous_gradients"] is expected, (name, sets)


SCRIPT = r'''
import json, sys
import torch, deepspeed
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
config = json.loads(open(sys.argv[1]).read())
config.update({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
               "gradient_clipping": 1.0})  # the template's "auto" values, as transformers fills them
config["fp16"]["enabled"] = config["bf16"]["enabled"] = False
engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                       config=config, dist_init_required=True)
data = torch.Generator().manual_seed(1)
losses = []
for micro in range(8):
    loss = torch.nn.functional.mse_loss(engine(torch.randn(4, 16, generator=data)), torch.randn(4, 4, generator=data))
    engine.backward(loss)
    engine.step()
    losses.append(float(loss))
print("RESULT " + json.dumps({"hooks": len(engine.optimizer._grad_acc_hooks), "losses": losses,
                              "norm": float(engine.get_global_grad_norm())}))
'''


@pytest.mark.train
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_hooks_no_gradient_at_stage_1_with_it(tmp_path, stage):
    pytest.importorskip("deepspeed")
    script = tmp_path / "engine.py"
    script.write_text(SCRIPT)
    results = {}
    for i, in_place in enumerate((False, True)):
        ds = tmp_path / f"ds_{in_place}.json"
        ds.write_text(render_template("deepspeed.json.j2", stage=stage, offload=False, gradients_in_place=in_place))
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29671 + 2 * stage + i), "RANK": "0",
               "WORLD_SIZE": "1", "LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run([sys.executable, str(script), str(ds)], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
        results[in_place] = json.loads(line.removeprefix("RESULT "))
    assert results[False]["hooks"] == 4  # two weights and two biases: one hook each
    assert results[True]["hooks"] == (0 if stage == 1 else 4)
    assert results[True]["losses"] == pytest.approx(results[False]["losses"], rel=1e-6)
    assert results[True]["norm"] == pytest.approx(results[False]["norm"], rel=1e-6)
