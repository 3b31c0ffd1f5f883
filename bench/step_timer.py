"""The benchmark's measure, installed in the production training entry as a TrainerCallback factory:

    python -m torch.distributed.run ... -m sftjobs.trainer.entry --callback bench.step_timer:callbacks ... CFG.yaml

(bench/train_command.py writes that command from a rendered run directory: the train step's own command plus
this hook; the run itself is the production one, switches and patches as the profile's speed section sets them.)

Per optimizer step, each rank writes to BENCH_OUT/timing_rank{R}.json: the synchronised wall time, the cumulative
non-padding tokens of all ranks (input_ids != pad_id, gathered once per step after the synchronisation, so the
count adds no GPU->CPU copy inside a step), all positions, the rank's peak CUDA memory, and its "phases": CPU time
and GPU time (CUDA events) in DeepSpeed's forward, backward and step (without DeepSpeed: the trainer's
compute_loss, accelerate's backward, the optimizer's step) and the step's whole GPU span. bench/summarize_prod.py
reads these files.

Environment (the benchmark's own, read here only):
  BENCH_OUT            folder for timing_rank{R}.json (default: the working directory)
  BENCH_EXIT_AT_END=1  leave right after the last step (skips the final multi-GB save, not part of the measure)
  BENCH_PROFILE_STEP=k torch.profiler over optimizer step k on rank 0: tables to BENCH_OUT/profile_rank0.txt, the
                       timeline to BENCH_OUT/trace_rank0.json.gz (bench/trace_gaps.py reads it); no Python stacks
                       unless BENCH_PROFILE_STACK=1 (they slow the CPU side, which is what is being measured)

HF's "non_padding" mode sums attention_mask, which is wrong for packed rows' index masks: hence the own count.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from transformers import TrainerCallback


def _patch_token_count() -> None:
    import transformers.trainer as T

    def _track(self, inputs):
        ids = inputs["input_ids"]
        pad = getattr(self.processing_class, "pad_token_id", None)
        pad = 0 if pad is None else pad
        t = torch.stack([(ids != pad).sum(), torch.tensor(ids.numel(), device=ids.device)]).to(
            device=self.args.device, dtype=torch.int64)
        # kept on the GPU; StepTimer.on_step_end gathers it after its own synchronisation
        StepTimer.pending = t if StepTimer.pending is None else StepTimer.pending + t
        StepTimer.trainer = self

    if hasattr(T.Trainer, "_track_num_input_tokens"):  # transformers 5: the loop's own per-micro-batch hook
        T.Trainer._track_num_input_tokens = _track
        return
    # transformers 4 (4.56.2) has no such hook: its loop counts inline (every position, with a gather and .item()
    # per micro-batch) when include_num_input_tokens_seen is set. Count in the training step instead (what the
    # trainer class holds now, sftjobs' patches included) and switch the inline count off (StepTimer.on_train_begin)
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

    step = CustomSeq2SeqTrainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        _track(self, inputs)
        return step(self, model, inputs, *args, **kwargs)

    CustomSeq2SeqTrainer.training_step = training_step
    StepTimer.inline_count = False


class Phases:
    """CPU (perf_counter) and GPU (CUDA events) time in DeepSpeed's forward, backward and step, per optimizer step.

    GPU time of a phase runs from the event recorded when its first kernel was queued to the one after its last:
    where it is close to the CPU time, the GPU waited on the CPU's launches in that phase."""

    marks: list = []  # (phase, "start"/"end", perf_counter, event)

    @classmethod
    def mark(cls, phase: str, edge: str) -> None:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        cls.marks.append((phase, edge, time.perf_counter(), ev))

    @classmethod
    def install(cls) -> None:
        if not torch.cuda.is_available():
            return
        from deepspeed.runtime.engine import DeepSpeedEngine

        for phase in ("forward", "backward", "step"):
            orig = getattr(DeepSpeedEngine, phase)

            def timed(self, *a, _orig=orig, _phase=phase, **k):
                cls.mark(_phase, "start")
                try:
                    with torch.profiler.record_function(f"bench::{_phase}"):  # named in a profiled step's trace
                        return _orig(self, *a, **k)
                finally:
                    cls.mark(_phase, "end")

            setattr(DeepSpeedEngine, phase, timed)

    @classmethod
    def install_plain(cls) -> None:
        """The same phases where no DeepSpeed engine runs (deepspeed: none): forward = the trainer's compute_loss
        (the model's forward and the loss), backward = accelerate's backward, step = the optimizer's step (the
        gradient-norm clip runs outside it here, inside DeepSpeed's step above)."""
        if not torch.cuda.is_available():
            return
        from accelerate import Accelerator
        from accelerate.optimizer import AcceleratedOptimizer
        from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

        for owner, attr, phase in ((CustomSeq2SeqTrainer, "compute_loss", "forward"),
                                   (Accelerator, "backward", "backward"), (AcceleratedOptimizer, "step", "step")):
            orig = getattr(owner, attr)

            def timed(self, *a, _orig=orig, _phase=phase, **k):
                cls.mark(_phase, "start")
                try:
                    with torch.profiler.record_function(f"bench::{_phase}"):
                        return _orig(self, *a, **k)
                finally:
                    cls.mark(_phase, "end")

            setattr(owner, attr, timed)

    @classmethod
    def take(cls, begin) -> dict:
        """After a synchronisation: the step's phases, summed over its micro-steps (ms), and reset."""
        out: dict = {"cpu_ms": {}, "gpu_ms": {}, "count": {}}
        if begin is None or not cls.marks:
            cls.marks = []
            return out
        t0, e0 = begin
        open_: dict = {}
        for phase, edge, t, ev in cls.marks:
            if edge == "start":
                open_[phase] = (t, ev)
                continue
            if phase not in open_:
                continue
            ts, es = open_.pop(phase)
            out["cpu_ms"][phase] = round(out["cpu_ms"].get(phase, 0.0) + (t - ts) * 1000, 3)
            out["gpu_ms"][phase] = round(out["gpu_ms"].get(phase, 0.0) + es.elapsed_time(ev), 3)
            out["count"][phase] = out["count"].get(phase, 0) + 1
        last_t, last_ev = cls.marks[-1][2], cls.marks[-1][3]
        out["cpu_span_ms"] = round((last_t - t0) * 1000, 3)
        out["gpu_span_ms"] = round(e0.elapsed_time(last_ev), 3)
        cls.marks = []
        return out


# ----------------------------------------------------------------------------- timer


class StepTimer(TrainerCallback):
    all_tokens = 0
    pending = None  # this rank's [non-padding, all] tokens of the step so far, on the GPU
    trainer = None
    inline_count = True  # False: the trainer's own inline token count is switched off (transformers 4)

    def __init__(self):
        self.rank = int(os.environ.get("RANK", "0"))
        self.out = os.environ.get("BENCH_OUT", ".")
        self.profile_step = int(os.environ.get("BENCH_PROFILE_STEP", "0"))
        self.prof = None
        self.rec = {"steps": [], "t": [], "tokens": [], "all_tokens": [], "t_train_begin": None, "mem_alloc_GiB": [],
                    "phases": []}
        self.begin = None

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _dump(self):
        rec = dict(self.rec)
        if torch.cuda.is_available():
            rec["max_mem_alloc_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            rec["max_mem_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30
            rec["device"] = torch.cuda.get_device_name(0)
        rec["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
        with open(os.path.join(self.out, f"timing_rank{self.rank}.json"), "w") as f:
            json.dump(rec, f)

    def on_train_begin(self, args, state, control, **kw):
        if not StepTimer.inline_count:  # _patch_token_count counts them: not twice
            args.include_num_input_tokens_seen = False
        self._sync()
        self.rec["t_train_begin"] = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.begin = (time.perf_counter(), ev)
        Phases.marks = []
        if self.profile_step and state.global_step + 1 == self.profile_step and self.rank == 0:
            self._sync()
            self.prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                with_stack=os.environ.get("BENCH_PROFILE_STACK") == "1")
            self.prof.__enter__()
            self.t_prof = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self._sync()
        if StepTimer.pending is not None:  # the step's token count, gathered once (after the synchronisation)
            tr = StepTimer.trainer
            g = tr.accelerator.gather(StepTimer.pending.view(1, 2)).view(-1, 2).sum(0).tolist()
            StepTimer.pending = None
            state.num_input_tokens_seen += int(g[0])
            StepTimer.all_tokens += int(g[1])
        self.rec["phases"].append(Phases.take(self.begin))
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            wall = time.perf_counter() - self.t_prof
            events = self.prof.key_averages()
            busy_us = sum(e.self_device_time_total for e in events)
            with open(os.path.join(self.out, "profile_rank0.txt"), "w") as f:
                f.write(f"optimizer step {state.global_step}: wall {wall * 1000:.1f} ms, summed GPU kernel time "
                        f"{busy_us / 1000:.1f} ms ({busy_us / 1e4 / wall:.0f}% of wall; overlapping streams can exceed)\n\n")
                f.write(events.table(sort_by="self_device_time_total", row_limit=35))
                f.write("\n\n")
                f.write(events.table(sort_by="cpu_time_total", row_limit=45))
                f.write("\n\n")
                if os.environ.get("BENCH_PROFILE_STACK") == "1":
                    f.write(self.prof.key_averages(group_by_stack_n=6).table(sort_by="cpu_time_total", row_limit=25))
            trace = os.path.join(self.out, "trace_rank0.json")
            self.prof.export_chrome_trace(trace)
            import gzip
            import shutil

            with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.remove(trace)
            self.prof = None
        self.rec["steps"].append(state.global_step)
        self.rec["t"].append(time.perf_counter())
        self.rec["tokens"].append(int(getattr(state, "num_input_tokens_seen", 0) or 0))
        self.rec["all_tokens"].append(int(StepTimer.all_tokens))
        if torch.cuda.is_available():
            self.rec["mem_alloc_GiB"].append(round(torch.cuda.max_memory_allocated() / 2**30, 2))
        if self.rank == 0:
            n = len(self.rec["t"])
            dt = self.rec["t"][-1] - (self.rec["t"][-2] if n > 1 else self.rec["t_train_begin"])
            dtok = self.rec["tokens"][-1] - (self.rec["tokens"][-2] if n > 1 else 0)
            ws = max(1, int(os.environ.get("WORLD_SIZE", "1")))
            mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0
            print(f"[bench] step {state.global_step} dt={dt:.3f}s tokens={dtok} tok/s/gpu={dtok / dt / ws:.0f} "
                  f"mem={mem:.1f}GiB", flush=True)
        self._dump()  # every step: a run stopped by its time limit still leaves its numbers
        if state.global_step >= state.max_steps and os.environ.get("BENCH_EXIT_AT_END") == "1":
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            print(f"[bench] rank {self.rank} done, exiting before the final save", flush=True)
            os._exit(0)


def uses_deepspeed(argv: list[str]) -> bool:
    """Whether the run's YAML (argv[1], as the entry hands it to LLaMA-Factory) with its key=value overrides
    names a DeepSpeed config."""
    import yaml

    with open(argv[1]) as f:
        deepspeed = (yaml.safe_load(f) or {}).get("deepspeed")
    for item in argv[2:]:
        key, _, value = item.partition("=")
        if key == "deepspeed":
            deepspeed = value
    return bool(deepspeed) and str(deepspeed).lower() not in ("none", "null")


def callbacks():
    """The --callback factory: the token count and the phase timers installed, the step timer returned."""
    _patch_token_count()
    if uses_deepspeed(sys.argv):
        Phases.install()
    else:  # deepspeed: none (plain torch; DDP on several GPUs)
        Phases.install_plain()
    return StepTimer()
