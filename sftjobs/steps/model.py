"""The model step on its node: download (hub), check a local path, or make a synthetic model.

model.source synthetic makes random weights of model.synthetic_shape: tiny (the CPU demo) or the real
dimensions of Qwen2.5-0.5B / -3B-Instruct (GPU runs without the hub; bf16, built on the GPU when one is
visible). A tokenizer placed in model.local_dir beforehand is used; otherwise one is trained on synthetic
ARPO-shaped text.
"""

from __future__ import annotations

from pathlib import Path

from sftjobs.io.model_files import check_model_dir, fetch_model
from sftjobs.node.context import StepContext


def run(ctx: StepContext) -> None:
    model = ctx.profile["model"]
    model_dir = Path(ctx.paths["model_dir"])
    if model["source"] == "synthetic":
        from sftjobs.io.demo_assets import make_demo_model, make_synthetic_arpo

        corpus = Path(ctx.paths["data_dir"]) / "source" / "tokenizer_corpus.jsonl"
        if not corpus.exists():
            make_synthetic_arpo(corpus, 400, seed=1)
        make_demo_model(model_dir, corpus, log=ctx.log, shape=model.get("synthetic_shape") or "tiny")
    elif model["source"] == "path":
        fetch_model(hub_id=None, local_dir=None, path=model_dir, log=ctx.log)
    else:
        fetch_model(hub_id=model["hub_id"], local_dir=model_dir, path=None, revision=model["revision"], log=ctx.log)
    ctx.write_report({"model_dir": str(model_dir), **check_model_dir(model_dir, hub=model["source"] == "hub")})
