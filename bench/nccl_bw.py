"""NCCL bandwidth between the GPUs of this host: all_reduce, reduce_scatter, all_gather of bf16 buffers.

    torchrun --nproc_per_node N bench/nccl_bw.py OUT.json
bus bandwidth as nccl-tests reports it: all_reduce 2(n-1)/n x bytes / t, the others (n-1)/n x bytes / t.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("nccl")
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    res = {"world_size": n}
    for mb in (64, 1024):
        numel = mb * 2**20 // 2
        x = torch.randn(numel, dtype=torch.bfloat16, device="cuda")
        out_rs = torch.empty(numel // n, dtype=torch.bfloat16, device="cuda")
        for name, fn, factor in (
            ("all_reduce", lambda x=x: dist.all_reduce(x), 2 * (n - 1) / n),
            ("reduce_scatter", lambda x=x, o=out_rs: dist.reduce_scatter_tensor(o, x), (n - 1) / n),
            ("all_gather", lambda x=x, o=out_rs: dist.all_gather_into_tensor(x, o), (n - 1) / n),
        ):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            iters = 10
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / iters
            res[f"{name}_{mb}MiB_busbw_GBps"] = round(factor * numel * 2 / dt / 1e9, 1)
            res[f"{name}_{mb}MiB_ms"] = round(dt * 1000, 3)
    if rank == 0:
        print(json.dumps(res), flush=True)
        with open(sys.argv[1], "w") as f:
            json.dump(res, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
