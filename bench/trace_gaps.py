"""Where the GPU waits in one profiled optimizer step: idle gaps in a torch.profiler chrome trace.

    python bench/trace_gaps.py out_P/trace_rank0.json.gz [OUT.txt]

Busy time is the union of all kernels, copies and memsets on the GPU (every stream). A gap is a stretch with none.
Each gap is put down to the launch that ended it (the CUDA runtime or driver call correlated with the next kernel;
Triton's and cuBLASLt's kernels are launched through the driver, cuLaunchKernelEx): the phase it was launched in
(bench/step_timer.py's bench::forward / backward / step annotations), and the innermost operator around that
launch. A gap that a synchronising call (cudaStreamSynchronize, cudaDeviceSynchronize, a blocking
copy) ran into is marked "after sync": the CPU waited for the GPU to drain, and the GPU then waited for the CPU.
The idle time is also summed by the kernel that ended each gap (which kernels the GPU waited for).
"""

from __future__ import annotations

import bisect
import collections
import gzip
import json
import sys

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ",
              "cudaMemcpy\0", "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize")
LAUNCH_CATS = {"cuda_runtime", "cuda_driver"}
MIN_GAP_US = 5.0


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return [e for e in data.get("traceEvents", data) if e.get("ph") == "X" and "dur" in e]


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def enclosing(ops: list[dict], starts: list[float], t: float) -> list[dict]:
    """The ops (sorted by start) that contain time t, outermost first."""
    i = bisect.bisect_right(starts, t)
    found = [o for o in ops[max(0, i - 400):i] if o["ts"] <= t <= o["ts"] + o["dur"]]
    return sorted(found, key=lambda o: (o["ts"], -o["dur"]))


def analyse(events: list[dict]) -> str:
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    cpu = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation")]
    launches = [e for e in events if e.get("cat") in LAUNCH_CATS]
    if not gpu or not cpu:
        return "no GPU or CPU events in this trace\n"
    by_corr = {e["args"].get("correlation"): e for e in launches if "args" in e}
    phases = sorted((e for e in cpu if e["name"].startswith("bench::")), key=lambda e: e["ts"])
    ops_by_tid: dict = collections.defaultdict(list)
    for e in cpu:
        if not e["name"].startswith("bench::"):
            ops_by_tid[e["tid"]].append(e)
    for ops in ops_by_tid.values():
        ops.sort(key=lambda o: o["ts"])
    starts_by_tid = {tid: [o["ts"] for o in ops] for tid, ops in ops_by_tid.items()}
    syncs = sorted((e for e in launches if e["name"].startswith(SYNC_CALLS) or e["name"] == "cudaMemcpy"),
                   key=lambda e: e["ts"])

    t0 = min(e["ts"] for e in cpu)
    t1 = max(e["ts"] + e["dur"] for e in gpu + cpu)
    busy = union([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    gaps, prev_end = [], t0
    for s, e in busy:
        if s - prev_end >= MIN_GAP_US:
            gaps.append((prev_end, s))
        prev_end = max(prev_end, e)
    if t1 - prev_end >= MIN_GAP_US:
        gaps.append((prev_end, t1))
    first_kernel_at = {}
    for e in sorted(gpu, key=lambda e: e["ts"]):
        first_kernel_at.setdefault(e["ts"], e)
    kernel_starts = sorted(first_kernel_at)

    by_phase: collections.Counter = collections.Counter()
    by_op: collections.Counter = collections.Counter()
    by_kernel: collections.Counter = collections.Counter()
    kernel_gaps: collections.Counter = collections.Counter()
    after_sync = 0.0
    rows = []
    for gs, ge in gaps:
        dur = ge - gs
        k = first_kernel_at.get(ge)
        if k is None and kernel_starts:
            j = bisect.bisect_left(kernel_starts, ge)
            k = first_kernel_at[kernel_starts[min(j, len(kernel_starts) - 1)]] if j < len(kernel_starts) else None
        launch = by_corr.get((k or {}).get("args", {}).get("correlation"))
        at = launch["ts"] if launch else ge
        phase = next((p["name"][7:] for p in reversed(phases) if p["ts"] <= at <= p["ts"] + p["dur"]), "outside")
        stack = enclosing(ops_by_tid.get(launch["tid"], []), starts_by_tid.get(launch["tid"], []), at) if launch else []
        inner = stack[-1]["name"] if stack else (launch["name"] if launch else "end of window")
        outer = next((o["name"] for o in stack if not o["name"].startswith("aten::")), stack[0]["name"] if stack else "")
        j = bisect.bisect_right([s["ts"] for s in syncs], ge) - 1
        synced = j >= 0 and syncs[j]["ts"] + syncs[j]["dur"] >= gs - 1
        if synced:
            after_sync += dur
        by_phase[phase] += dur
        by_op[f"{phase} | {outer[:60]} > {inner[:50]}"] += dur
        kname = (k or {}).get("name", "")[:50]
        kernel = f"{kname or 'none'} | {inner[:40]}"
        by_kernel[kernel] += dur
        kernel_gaps[kernel] += 1
        rows.append((dur, gs - t0, phase, outer, inner, synced, kname))

    wall = t1 - t0
    busy_us = sum(e - s for s, e in busy)
    idle_us = sum(ge - gs for gs, ge in gaps)
    lines = [f"window {wall / 1000:.1f} ms: GPU busy {busy_us / 1000:.1f} ms ({100 * busy_us / wall:.0f}%), "
             f"idle {idle_us / 1000:.1f} ms in {len(gaps)} gaps >= {MIN_GAP_US:.0f} us; "
             f"{after_sync / 1000:.1f} ms of it after a synchronising call"]
    for p in phases:
        lines.append(f"  phase {p['name'][7:]:9s} at {(p['ts'] - t0) / 1000:8.1f} ms, CPU {p['dur'] / 1000:7.1f} ms")
    lines.append("\nidle by phase of the launch that ended it (ms):")
    lines += [f"  {k:10s} {v / 1000:8.1f}" for k, v in by_phase.most_common()]
    lines.append("\nidle by phase | outermost non-aten op > innermost op at that launch (ms, top 25):")
    lines += [f"  {v / 1000:8.2f}  {k}" for k, v in by_op.most_common(25)]
    lines.append("\nidle by the kernel that ended it | innermost op at its launch (ms, gaps; top 15):")
    lines += [f"  {v / 1000:8.2f} {kernel_gaps[k]:5d}  {k}" for k, v in by_kernel.most_common(15)]
    lines.append("\nlongest gaps (ms, at ms into the window):")
    for dur, at, phase, outer, inner, synced, kname in sorted(rows, reverse=True)[:30]:
        lines.append(f"  {dur / 1000:7.2f} at {at / 1000:8.1f}  {phase:9s} {'after sync ' if synced else ''}"
                     f"{outer[:45]} > {inner[:40]}  -> {kname}")
    return "\n".join(lines) + "\n"


def main() -> None:
    text = analyse(load(sys.argv[1]))
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
