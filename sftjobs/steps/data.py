"""The data step on its node: fetch (hub, path or synthetic), validate and split, register the shape."""

from __future__ import annotations

import json
from pathlib import Path

from sftjobs.fsutil import atomic_write_text
from sftjobs.io.data_files import download_data_file, prepare_data
from sftjobs.node.context import StepContext
from sftjobs.render import dataset_info


def source_file(ctx: StepContext) -> Path:
    data = ctx.profile["data"]
    data_dir = Path(ctx.paths["data_dir"])
    if data["source"] == "path":
        return Path(ctx.paths["data_path"])
    if data["source"] == "synthetic":
        from sftjobs.io.demo_assets import make_synthetic_arpo

        path = data_dir / "source" / f"synthetic_{data['synthetic_rows']}.jsonl"
        if not path.exists():
            make_synthetic_arpo(path, data["synthetic_rows"], seed=0)
            ctx.log(f"made {data['synthetic_rows']} synthetic ARPO-shaped rows in {path}")
        return path
    return download_data_file(data["hub_repo"], data["hub_file"], data_dir / "source", revision=data["revision"])


def run(ctx: StepContext) -> None:
    data = ctx.profile["data"]
    source = source_file(ctx)
    expected = None if data["shape"] == "auto" else data["shape"]
    report = prepare_data(source, Path(ctx.paths["data_dir"]), toy_samples=data["toy_samples"],
                          max_bad_fraction=float(data["max_bad_fraction"]), expected_shape=expected, log=ctx.log)
    # The run's registry must describe the shape that was found (data.shape: auto) before anything trains.
    info_path = ctx.run_dir / "dataset" / "dataset_info.json"
    registered = json.loads(info_path.read_text())[data["dataset"]]["formatting"]
    if registered != report["shape"]:
        atomic_write_text(info_path, dataset_info(report["shape"], ctx.paths["data_dir"]))
        ctx.log(f"registered the data as {report['shape']} in {info_path}")
    ctx.write_report({k: v for k, v in report.items() if k != "bad_examples"} | {"bad_examples": report.get("bad_examples", [])[:20]})
