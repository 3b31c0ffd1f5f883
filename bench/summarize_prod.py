"""Summarise a bench/bench_prod.sh work folder into one JSON (bench/results/prod_<tag>.json) and a markdown table.

    python bench/summarize_prod.py WORKDIR OUT.json OUT.md [WARM]

Per training item (WORKDIR/out_<name>/timing_rank*.json from bench/step_timer.py):
  tok/s/GPU  = non-padding input tokens of all ranks over the measured steps (after WARM warm-up steps) / wall
               time / GPUs;  MFU = 6 * N * tok/s/GPU / (bf16 matmul peak measured in the same call), N = the
               model's parameter count (tied embeddings counted once); no attention FLOPs, no recompute.
  peak GiB   = torch max_memory_allocated / max_memory_reserved (highest rank) and nvidia-smi's largest use.
  projection = 54,000 samples x 3 epochs x mean tokens/sample (this data, after the chat template) / (tok/s/GPU
               x 8 GPUs), assuming the per-GPU rate seen here holds on 8 GPUs (not measured).
For the chain's dry run (sftjobs' own train step, no harness): tok/s/GPU from LLaMA-Factory's trainer_log.jsonl
(total_tokens / throughput gives the time of each logged step), peak memory from sftjobs' monitor samples.
speedup = P (sftjobs' prod as it stands) tok/s/GPU / A tok/s/GPU. Items are described and ordered by bench/items.txt.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import statistics
import struct
import sys

HOURS_SAMPLES, EPOCHS, PROJ_GPUS = 54000, 3, 8

ITEMS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "items.txt")


def read_items(path: str = ITEMS_FILE) -> dict[str, dict[str, str]]:
    """bench/items.txt: NAME -> its fields (where, profile, steps, limit_s, overrides, what), in the file's order."""
    items: dict[str, dict[str, str]] = {}
    with open(path) as f:
        for line in f:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, *fields = [x.strip() for x in line.rstrip("\n").split(" | ")]
            items[name] = dict(zip(("where", "profile", "steps", "limit_s", "overrides", "what"), fields, strict=True))
    return items


def description(name: str, items: dict[str, dict[str, str]]) -> str:
    base, _, rep = name.rpartition("_r")
    if base and rep.isdigit() and name not in items:
        return f"{description(base, items)} (repeat #{rep} in the same call)"
    return items[name]["what"] if name in items else name


def n_params_of(model_dir: str) -> int:
    total = 0
    for path in glob.glob(os.path.join(model_dir, "*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                p = 1
                for d in info["shape"]:
                    p *= int(d)
                total += p
    return total


def monitor_peaks_mib(paths: list[str]) -> dict:
    """Per GPU index, the highest nvidia-smi memory.used (MiB) in sftjobs' monitor/*.jsonl samples."""
    peaks: dict = {}
    for path in paths:
        for line in open(path):
            try:
                sample = json.loads(line)
            except ValueError:
                continue  # a torn last line
            for g in sample.get("gpus", []):
                peaks[g["index"]] = max(peaks.get(g["index"], 0), g["mem_used_mib"])
    return peaks


def mean_tokens(workdir: str) -> float | None:
    try:
        from datasets import load_from_disk

        path = os.path.join(workdir, "tok_prod")
        if not os.path.isdir(path):  # the chain's dry run tokenized the same data unpacked
            path = (glob.glob(os.path.join(workdir, "jobs", "*", "tokenized")) or [path])[0]
        ds = load_from_disk(path)
        ds = ds["train"] if hasattr(ds, "keys") and "train" in ds else ds
        lens = [len(x) for x in ds["input_ids"]]
        return sum(lens) / len(lens)
    except Exception as exc:  # noqa: BLE001
        print("no tokenized lengths:", repr(exc)[:200])
        return None


def smi_peak(path: str) -> float | None:
    try:
        rows = [r for r in csv.reader(open(path)) if len(r) >= 3]
        return max(float(r[2].strip().split()[0]) for r in rows) / 1024
    except Exception:  # noqa: BLE001
        return None


def read_yaml(path: str) -> dict:
    try:
        import yaml

        return yaml.safe_load(open(path)) or {}
    except Exception:  # noqa: BLE001
        return {}


def phase_means(recs: list[dict], files: list[str], keep: list[int]) -> dict | None:
    """bench/step_timer.py's per-step phases (DeepSpeed forward / backward / step; CPU and GPU ms), mean over the measured
    steps: rank 0's, and the slowest rank's GPU span."""
    out: dict = {}
    for f, r in zip(files, recs, strict=True):
        ph = r.get("phases") or []
        steps = [ph[i] for i in keep if i < len(ph) and ph[i].get("gpu_span_ms") is not None]
        if not steps:
            continue
        rank = os.path.basename(f)[len("timing_rank"):-len(".json")]
        mean = lambda xs: round(sum(xs) / len(xs), 1)  # noqa: E731
        names = sorted({k for s in steps for k in s["cpu_ms"]})
        out[f"rank{rank}"] = {
            "gpu_span": mean([s["gpu_span_ms"] for s in steps]), "cpu_span": mean([s["cpu_span_ms"] for s in steps]),
            **{f"{k}_cpu": mean([s["cpu_ms"].get(k, 0.0) for s in steps]) for k in names},
            **{f"{k}_gpu": mean([s["gpu_ms"].get(k, 0.0) for s in steps]) for k in names},
            **{f"{k}_calls": mean([s["count"].get(k, 0) for s in steps]) for k in names}}
    return out or None


def harness_item(workdir: str, name: str, warm: int, n_params: int, peak: float, mean_tok: float | None) -> dict | None:
    od = os.path.join(workdir, f"out_{name}")
    if not os.path.isdir(od):
        return None
    d: dict = {"description": description(name, read_items())}
    cfg = read_yaml(os.path.join(od, "train.yaml"))
    ds = {}
    try:
        ds = json.load(open(os.path.join(od, "deepspeed.json")))
    except Exception:  # noqa: BLE001
        pass
    zero = ds.get("zero_optimization", {})
    d["config"] = {k: cfg.get(k) for k in ("per_device_train_batch_size", "gradient_accumulation_steps", "cutoff_len",
                                           "packing", "neat_packing", "enable_liger_kernel", "flash_attn",
                                           "disable_gradient_checkpointing", "optim", "max_steps") if k in cfg}
    d["config"]["zero_stage"] = zero.get("stage")
    d["config"]["offload"] = "offload_optimizer" in zero
    d["config"]["overlap_comm"] = zero.get("overlap_comm")
    try:
        d["rc"] = int(open(os.path.join(od, "rc")).read().strip())
    except Exception:  # noqa: BLE001
        d["rc"] = None
    files = sorted(glob.glob(os.path.join(od, "timing_rank*.json")))
    if not files:
        d["error"] = "no timing data: failed before its first step (see train.log)"
        return d
    recs = [json.load(open(f)) for f in files]
    r0 = next((r for f, r in zip(files, recs, strict=True) if f.endswith("timing_rank0.json")), recs[0])
    t, tok, allt = r0["t"], r0["tokens"], r0.get("all_tokens") or r0["tokens"]
    ws = r0.get("world_size", 1)
    n = len(t)
    d.update({"gpus": ws, "world_size": ws, "steps_done": n, "device": r0.get("device"),
              "peak_alloc_GiB": round(max(r.get("max_mem_alloc_GiB", 0) for r in recs), 2),
              "peak_reserved_GiB": round(max(r.get("max_mem_reserved_GiB", 0) for r in recs), 2),
              "smi_peak_used_GiB": smi_peak(os.path.join(od, "smi.csv"))})
    if d["smi_peak_used_GiB"]:
        d["smi_peak_used_GiB"] = round(d["smi_peak_used_GiB"], 2)
    bs, ga = cfg.get("per_device_train_batch_size", 1), cfg.get("gradient_accumulation_steps", 1)
    d["rows_per_step"] = ws * bs * ga
    w = min(warm, max(1, n - 2))
    # a step run under torch.profiler (BENCH_PROFILE_STEP) is many times slower: leave it out of the measure
    profiled = None
    try:
        first = open(os.path.join(od, "profile_rank0.txt")).readline()
        profiled = int(first.split("optimizer step ")[1].split(":")[0])
    except (OSError, IndexError, ValueError):
        pass
    if n >= w + 2:
        keep = [i for i in range(w, n) if r0["steps"][i] != profiled]
        dt = [t[i] - t[i - 1] for i in keep]
        span = sum(dt)
        ntok = sum(tok[i] - tok[i - 1] for i in keep)
        nall = sum(allt[i] - allt[i - 1] for i in keep)
        tps = ntok / span / ws
        if profiled is not None:
            d["profiled_step_excluded"] = profiled
        n_meas = len(keep)
        d.update({"warmup_steps": w, "measured_steps": n_meas, "s_per_step_mean": round(span / n_meas, 3),
                  "s_per_step_median": round(statistics.median(dt), 3), "s_per_step_min": round(min(dt), 3),
                  "s_per_step_max": round(max(dt), 3), "tokens_per_step": round(ntok / n_meas),
                  "pad_fraction": round(1 - ntok / nall, 4) if nall else None, "tok_s_gpu": round(tps, 1),
                  "mfu": round(6 * n_params * tps / (peak * 1e12), 4) if peak else None,
                  "mfu_780": round(6 * n_params * tps / 780e12, 4)})
        ph = phase_means(recs, files, keep)
        if ph:
            d["phases_ms"] = ph
        if mean_tok:
            d["samples_per_step_est"] = round(ntok / n_meas / mean_tok, 1)
            d["proj_54k_x3_8gpu_h"] = round(HOURS_SAMPLES * EPOCHS * mean_tok / (tps * PROJ_GPUS) / 3600, 2)
    else:
        d["error"] = f"only {n} steps done (need {w + 2}); see train.log"
    return d


def chain_item(workdir: str, n_params: int, peak: float, mean_tok: float | None, ngpu: int) -> dict | None:
    try:
        run = open(os.path.join(workdir, "chain_run_id")).read().strip()
    except OSError:
        return None
    run_dir = os.path.join(workdir, "jobs", run)
    d: dict = {"description": "the prod chain through sftjobs itself (`sftjobs submit prod --dry-run-first "
                              "--executor local` as configs/prod.yaml stands): its dry run, measured from "
                              "LLaMA-Factory's trainer_log.jsonl and sftjobs' monitor", "run_id": run}
    try:
        d["status_table"] = open(os.path.join(workdir, "chain_status.txt")).read()
    except OSError:
        pass
    try:
        plan = json.load(open(os.path.join(run_dir, "plan.json")))
        log_path = os.path.join(plan["paths"]["dry_run_output_dir"], "trainer_log.jsonl")
    except Exception as exc:  # noqa: BLE001
        d["error"] = f"no plan.json: {exc!r}"[:200]
        return d
    if not os.path.exists(log_path):  # the copy bench_prod.sh keeps beside the run
        log_path = os.path.join(workdir, "chain_trainer_log.jsonl")
    entries = []
    for line in open(log_path) if os.path.exists(log_path) else []:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("total_tokens") and e.get("throughput"):
            entries.append(e)
    if os.path.exists(log_path) and log_path != os.path.join(workdir, "chain_trainer_log.jsonl"):
        import shutil

        shutil.copyfile(log_path, os.path.join(workdir, "chain_trainer_log.jsonl"))
    if len(entries) >= 2:
        e0, e1 = entries[0], entries[-1]
        t0, t1 = e0["total_tokens"] / e0["throughput"], e1["total_tokens"] / e1["throughput"]
        steps = e1["current_steps"] - e0["current_steps"]
        tps = (e1["total_tokens"] - e0["total_tokens"]) / (t1 - t0) / ngpu
        d.update({"gpus": ngpu, "total_steps": e1.get("total_steps"), "measured_from_step": e0["current_steps"],
                  "measured_to_step": e1["current_steps"], "s_per_step_mean": round((t1 - t0) / steps, 3),
                  "tokens_per_step": round((e1["total_tokens"] - e0["total_tokens"]) / steps),
                  "tok_s_gpu": round(tps, 1), "mfu": round(6 * n_params * tps / (peak * 1e12), 4) if peak else None,
                  "first_loss": entries[0].get("loss"),
                  "last_loss": next((e["loss"] for e in reversed(entries) if "loss" in e), None),
                  "train_wall_s": round(t1, 1)})
        if mean_tok:
            d["proj_54k_x3_8gpu_h"] = round(HOURS_SAMPLES * EPOCHS * mean_tok / (tps * PROJ_GPUS) / 3600, 2)
    else:
        d["error"] = f"trainer_log has {len(entries)} entries with token counts ({log_path})"
    peaks = monitor_peaks_mib(glob.glob(os.path.join(run_dir, "monitor", "dry_run[.-]*.jsonl")))
    if peaks:
        d["smi_peak_used_GiB"] = round(max(peaks.values()) / 1024, 2)
    for name in ("validate_dry_run", "preflight"):
        rp = os.path.join(run_dir, "reports", f"{name}.json")
        if os.path.exists(rp):
            try:
                rep = json.load(open(rp))
                checks = rep.get("checks") or {}
                if name == "preflight":
                    checks = {k: (v.get("ok"), v.get("summary")) for k, v in checks.items() if isinstance(v, dict)}
                d[f"{name}_report"] = {"ok": rep.get("ok"), "failures": rep.get("failures"), "checks": checks}
            except Exception:  # noqa: BLE001
                pass
    return d


def main() -> None:
    workdir, out_json, out_md = sys.argv[1], sys.argv[2], sys.argv[3]
    warm = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    load = lambda p: json.load(open(os.path.join(workdir, p))) if os.path.exists(os.path.join(workdir, p)) else None  # noqa: E731
    peak_info = load("peak.json") or {}
    peak = peak_info.get("matmul_bf16_tflops")
    # re-summarising an unpacked results tarball elsewhere: the model and tokenized data are not in it
    n_params = n_params_of(os.path.join(workdir, "model")) or int(os.environ.get("BENCH_N_PARAMS", "0"))
    mean_tok = mean_tokens(workdir) or (float(os.environ["BENCH_MEAN_TOKENS"]) if "BENCH_MEAN_TOKENS" in os.environ else None)
    gpus = []
    try:
        gpus = [r for r in csv.DictReader(open(os.path.join(workdir, "gpus.csv")), skipinitialspace=True)]
    except Exception:  # noqa: BLE001
        pass
    ngpu = len(gpus) or 1
    names = [os.path.basename(p)[4:] for p in sorted(glob.glob(os.path.join(workdir, "out_*")))]
    known = list(read_items())
    order = [n for n in known if n in names] + [n for n in names if n not in known]
    configs = {n: harness_item(workdir, n, warm, n_params, peak, mean_tok) for n in order}
    chain = chain_item(workdir, n_params, peak, mean_tok, ngpu)
    if chain:
        configs["chain_dry_run"] = chain
    card = f"{ngpu}x {gpus[0].get('name')}" if gpus else None
    res = {
        "card": card,
        "gpus": ngpu,
        "world_size": ngpu,
        "gpu_info": gpus,
        "bf16_matmul_peak_tflops": peak,
        "n_params": n_params,
        "mfu_formula": "6 * n_params * tok_s_gpu / bf16_matmul_peak (no attention FLOPs, no recompute); mfu_780: the "
                       "same over 780 TFLOP/s, the H100 convention of issue 20's targets (40% = 16,800 tok/s/GPU)",
        "data": {**(load("data/sft.jsonl.stats.json") or {}), "mean_tokens_per_sample_after_template": mean_tok},
        "projection": f"{HOURS_SAMPLES} samples x {EPOCHS} epochs x mean tokens/sample / (tok_s_gpu x {PROJ_GPUS} GPUs); "
                      "assumes the per-GPU rate measured here holds on 8 GPUs (not measured)",
        "warmup_steps": warm,
        "skipped": open(os.path.join(workdir, "skipped.txt")).read().split("\n") if os.path.exists(os.path.join(workdir, "skipped.txt")) else [],
        "configs": configs,
    }
    a = (configs.get("A") or {}).get("tok_s_gpu")
    s = (configs.get("P") or {}).get("tok_s_gpu") or (chain or {}).get("tok_s_gpu")
    res["speedup"] = round(s / a, 2) if a and s else None
    for c in configs.values():
        if c and a and c.get("tok_s_gpu"):
            c["speedup_vs_A"] = round(c["tok_s_gpu"] / a, 2)
    with open(out_json, "w") as f:
        json.dump(res, f, indent=1)
    rows = ["| item | GPUs | measured steps | s/step mean (median) | tokens/step | tok/s/GPU | MFU (measured peak) | MFU (780) | peak GiB alloc / reserved / smi | 54Kx3 on 8 GPUs (h) | vs A |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, c in configs.items():
        if not c:
            continue
        if "tok_s_gpu" not in c:
            rows.append(f"| {n} | | {c.get('error', 'no data')} | | | | | | | | |")
            continue
        mfu = f"{100 * c['mfu']:.1f}%" if c.get("mfu") is not None else "?"
        mem = f"{c.get('peak_alloc_GiB', '-')} / {c.get('peak_reserved_GiB', '-')} / {c.get('smi_peak_used_GiB', '-')}"
        ms = c.get("measured_steps", f"{c.get('measured_from_step')}..{c.get('measured_to_step')}")
        rows.append(f"| {n} | {c.get('gpus')} | {ms} | {c.get('s_per_step_mean')} ({c.get('s_per_step_median', '-')}) | "
                    f"{c.get('tokens_per_step')} | {c['tok_s_gpu']:.0f} | {mfu} | "
                    f"{(100 * c['mfu_780']) if c.get('mfu_780') is not None else float('nan'):.1f}% | {mem} | {c.get('proj_54k_x3_8gpu_h')} | "
                    f"{c.get('speedup_vs_A', '-')} |")
    prow = ["| item | rank | step GPU span | forward CPU / GPU | backward CPU / GPU | step CPU / GPU | calls f/b/s |",
            "|---|---|---|---|---|---|---|"]
    for n, c in configs.items():
        for rank, p in sorted(((c or {}).get("phases_ms") or {}).items()):
            g = lambda k, p=p: f"{p.get(k + '_cpu', '-')} / {p.get(k + '_gpu', '-')}"  # noqa: E731
            prow.append(f"| {n} | {rank} | {p['gpu_span']} | {g('forward')} | {g('backward')} | {g('step')} | "
                        f"{p.get('forward_calls', '-')}/{p.get('backward_calls', '-')}/{p.get('step_calls', '-')} |")
    md = (f"card: {card}; bf16 peak {peak} TFLOP/s; N = {n_params}; mean tokens/sample {mean_tok}\n\n" + "\n".join(rows)
          + f"\n\nspeedup (P/A) = {res['speedup']}\n")
    if len(prow) > 2:
        md += ("\nPer optimizer step, mean ms over the measured steps (bench/step_timer.py's phases: DeepSpeed forward, backward, "
               "step; CPU = Python time in the call, GPU = CUDA events around it):\n\n" + "\n".join(prow) + "\n")
    open(out_md, "w").write(md)
    print(md)
    print(json.dumps({k: v for k, v in res.items() if k != "configs"}, indent=1)[:3000])


if __name__ == "__main__":
    main()
