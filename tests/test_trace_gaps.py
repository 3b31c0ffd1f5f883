"""bench/trace_gaps.py: where the GPU waited in a profiled step, each idle gap put down to the launch that ended it,
runtime launches (cudaLaunchKernel) and driver launches (cuLaunchKernelEx: Triton's and cuBLASLt's kernels) alike."""

from __future__ import annotations

import gzip
import json

from tests.test_bench_items import load


def load_module():
    return load("trace_gaps")


def op(name, ts, dur, cat="cpu_op", tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1, "args": args}


def trace():
    """A forward phase: an aten::mm launched through the runtime, then (after 400 us of CPU work) a Triton RMSNorm
    launched through the driver, then a copy launched after a stream synchronisation."""
    return [
        op("bench::forward", 0, 1000, cat="user_annotation"),
        op("LigerRMSNormFunction", 500, 60),
        op("aten::mm", 10, 20),
        op("cudaLaunchKernel", 12, 5, cat="cuda_runtime", correlation=1),
        op("nvjet_sm90_mm", 20, 80, cat="kernel", tid=7, correlation=1),
        op("cuLaunchKernelEx", 540, 10, cat="cuda_driver", correlation=2),
        op("_rms_norm_forward_kernel", 550, 30, cat="kernel", tid=7, correlation=2),
        op("cudaStreamSynchronize", 600, 50, cat="cuda_runtime", correlation=3),
        op("aten::copy_", 700, 20),
        op("cudaMemcpyAsync", 705, 5, cat="cuda_runtime", correlation=4),
        op("Memcpy DtoD (Device -> Device)", 760, 40, cat="gpu_memcpy", tid=7, correlation=4),
    ]


def test_a_driver_launched_kernel_is_put_down_to_its_operator_not_to_the_window():
    gaps = load_module()
    text = gaps.analyse(trace())
    assert "end of window" not in text.split("longest gaps")[1].split("\n")[1], text
    by_kernel = text.split("idle by the kernel that ended it")[1].split("\n\n")[0]
    # 100 -> 550 us idle, ended by the RMSNorm kernel that LigerRMSNormFunction launched through the driver
    assert "0.45     1  _rms_norm_forward_kernel | LigerRMSNormFunction" in by_kernel, by_kernel
    assert "forward | LigerRMSNormFunction > LigerRMSNormFunction" in text
    # 580 -> 760 us: the copy, launched after the CPU waited on the stream
    assert "0.18     1  Memcpy DtoD (Device -> Device) | aten::copy_" in by_kernel, by_kernel
    assert "0.2 ms of it after a synchronising call" in text.splitlines()[0], text.splitlines()[0]


def test_it_reads_a_gzipped_chrome_trace(tmp_path):
    gaps = load_module()
    path = tmp_path / "trace_rank0.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": trace()}, f)
    assert len(gaps.load(str(path))) == len(trace())
