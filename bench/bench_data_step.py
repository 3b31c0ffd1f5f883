"""Benchmark of the data step: ARPO-sized input (54,000 sharegpt rows of ~15 KB, ~800 MB).

Times ``prepare_data`` on 5,400 and 54,000 rows and records each run's peak RSS, to show the pass
streams: memory must not grow with the file. Each run happens in a fresh interpreter, because
``ru_maxrss`` is a high-water mark for the life of a process (generating the data in the same process
would swamp it). A second run per size times the idempotent skip path (which re-hashes input and
outputs). The generated files live in a temporary directory and are deleted afterwards.

    .venv/bin/python bench/bench_data_step.py            # writes bench/results/data_step.json
    .venv/bin/python bench/bench_data_step.py --rows 5400 --small-rows 540 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

RESULTS = ROOT / "bench" / "results" / "data_step.json"
BAD_EVERY = 2000  # one planted bad row per 2,000 (0.05%), so the bad-record path is exercised too
TOY_SAMPLES = 500
MAX_BAD_FRACTION = 0.001


def generate(path: Path, rows: int, approx_bytes: int) -> int:
    from synthetic_data import ArpoSynth

    synth = ArpoSynth(seed=42, approx_bytes=approx_bytes)
    with open(path, "w", encoding="utf-8", buffering=1 << 20) as handle:
        for i in range(1, rows + 1):
            line = json.dumps(synth.sharegpt(i), ensure_ascii=False)
            if i % BAD_EVERY == 0:
                line = line[: len(line) // 2]  # a truncated line, as from a cut-off download
            handle.write(line + "\n")
    return path.stat().st_size


def child(source: str, out_dir: str) -> None:
    """Runs in its own interpreter: one prepare_data call, reporting time and memory as JSON."""
    from sftjobs.io.data_files import prepare_data

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    logged: list[str] = []
    started = time.perf_counter()
    report = prepare_data(
        Path(source),
        Path(out_dir),
        toy_samples=TOY_SAMPLES,
        max_bad_fraction=MAX_BAD_FRACTION,
        log=logged.append,
    )
    seconds = time.perf_counter() - started
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_mb": rss_after / 1024,  # Linux reports KiB
                "rss_after_imports_mb": rss_before / 1024,
                "skipped": report["skipped"],
                "rows_read": report["rows_read"],
                "valid": report["valid"],
                "bad": report["bad"],
                "log_head": logged[:3],
            }
        )
    )


def run_child(source: Path, out_dir: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(source), str(out_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"child failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_size(tmp: Path, rows: int, approx_bytes: int) -> dict:
    source = tmp / f"arpo_{rows}.jsonl"
    out_dir = tmp / f"out_{rows}"
    started = time.perf_counter()
    size = generate(source, rows, approx_bytes)
    gen_seconds = time.perf_counter() - started
    print(f"[{rows} rows] generated {size / 1e6:.0f} MB in {gen_seconds:.1f} s", flush=True)
    first = run_child(source, out_dir)
    print(f"[{rows} rows] prepare_data: {first['seconds']:.2f} s, peak RSS {first['peak_rss_mb']:.0f} MB", flush=True)
    second = run_child(source, out_dir)
    assert second["skipped"], "second run should have been skipped"
    print(f"[{rows} rows] rerun (skip, re-hash): {second['seconds']:.2f} s", flush=True)
    out_bytes = sum(p.stat().st_size for p in out_dir.iterdir())
    source.unlink()
    shutil.rmtree(out_dir)
    return {
        "rows": rows,
        "bytes": size,
        "mean_row_bytes": round(size / rows),
        "bad_rows_planted": rows // BAD_EVERY,
        "valid": first["valid"],
        "bad": first["bad"],
        "output_bytes": out_bytes,
        "seconds": round(first["seconds"], 2),
        "rows_per_s": round(rows / first["seconds"]),
        "mb_per_s": round(size / 1e6 / first["seconds"], 1),
        "peak_rss_mb": round(first["peak_rss_mb"], 1),
        "rss_after_imports_mb": round(first["rss_after_imports_mb"], 1),
        "rerun_skip_seconds": round(second["seconds"], 2),
        "generate_seconds": round(gen_seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=54_000)
    parser.add_argument("--small-rows", type=int, default=5_400)
    parser.add_argument("--row-bytes", type=int, default=15_000)
    parser.add_argument("--tmpdir", default=None, help="where to generate the input (needs ~2x its size free)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results alone")
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    with tempfile.TemporaryDirectory(prefix="sftjobs-bench-data-", dir=args.tmpdir) as tmp:
        small = bench_size(Path(tmp), args.small_rows, args.row_bytes)
        large = bench_size(Path(tmp), args.rows, args.row_bytes)
    result = {
        "benchmark": "data step: prepare_data on synthetic ARPO-shaped sharegpt JSONL (one streaming pass)",
        "machine": f"{os.cpu_count()}-core CPU (no GPU)",
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "target": "54K rows in < 60 s; peak RSS independent of file size",
        "params": {"toy_samples": TOY_SAMPLES, "max_bad_fraction": MAX_BAD_FRACTION, "row_bytes": args.row_bytes},
        "note": "input freshly written, so mostly read from the page cache; fsync of outputs included",
        "small": small,
        "large": large,
        "peak_rss_ratio_large_over_small": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "meets_target": large["seconds"] < 60,
    }
    print(json.dumps(result, indent=2))
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
