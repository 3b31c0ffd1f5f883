"""sftjobs command line: profiles, render, submit, status, logs, cancel, resume, demo.

Every user-fixable problem is an SftjobsError: one message on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sftjobs.errors import SftjobsError


def _add_profile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profile", metavar="PROFILE", help="a profile name from configs/ or a path to a YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile value, dotted keys (repeatable), e.g. --set train.cutoff_len=2048")
    parser.add_argument("--dry-run-first", action="store_true",
                        help="insert a dry run (dry_run.max_samples) whose validation gates the full run")


def cmd_profiles(args: argparse.Namespace) -> int:
    from sftjobs.profile import list_profile_names, read_yaml_mapping

    names = list_profile_names()
    width = max((len(n) for n in names), default=4)
    for name, path in names.items():
        try:
            summary = read_yaml_mapping(path).get("description", "")
        except SftjobsError as exc:
            summary = f"(broken: {exc})"
        print(f"{_one_line(name):<{width}}  {_one_line(summary)}  [{_one_line(path)}]")
    return 0


def _one_line(value: object) -> str:
    """Text from a file shown on one terminal line: a newline or an escape sequence is shown escaped."""
    text = str(value)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def cmd_render(args: argparse.Namespace) -> int:
    from sftjobs.planning.dag import build_plan
    from sftjobs.planning.memory import summary_line
    from sftjobs.planning.run import plan_run
    from sftjobs.profile import load_profile
    from sftjobs.render import memory_plan_of, render_files, write_run_dir
    from sftjobs.runs import jobs_dir, new_run_id

    profile = load_profile(args.profile, args.overrides)
    plan = build_plan(profile, dry_run_first=args.dry_run_first)
    run_id = new_run_id(profile.name)
    out = Path(args.out).absolute() if args.out else jobs_dir() / "rendered" / run_id
    files = render_files(plan_run(profile, plan, out, run_id))
    written = write_run_dir(files, out)
    print(f"rendered {profile.name} into {out} ({len(written)} files):")
    memory = memory_plan_of(files)
    if memory is not None:
        print(summary_line(memory))
    for path in written:
        print(f"  {path.relative_to(out)}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from sftjobs import submit as submitting

    prepared = submitting.prepare(args.profile, args.overrides, args.dry_run_first, args.executor)
    if args.preview:
        sys.stdout.write(submitting.preview(prepared))
        if prepared.refused:
            raise SftjobsError(prepared.refused)
        return 0
    print(f"executor: {prepared.executor_name} ({prepared.why})", flush=True)
    manifest = submitting.submit(prepared)
    print(f"run {manifest['run_id']} -> {prepared.run_dir}")
    for step, job_id in manifest["jobs"].items():
        print(f"  {step:<17} job {job_id}")
    if args.wait:
        return wait_for_run(prepared.run_dir, args.poll)
    return 0


def wait_for_run(run_dir: Path, poll: float) -> int:
    """Block until every step has finished, then print the table, and the loss plot if there is one."""
    import time

    from sftjobs.status import TERMINAL, collect, format_table

    last = None
    while True:
        rows, notes = collect([run_dir])
        summary = " ".join(f"{r.step}={r.state.state}" for r in rows)
        if summary != last:
            print(f"[{time.strftime('%H:%M:%S')}] {summary}", flush=True)
            last = summary
        if rows and all(r.state.state.split()[0] in TERMINAL for r in rows):
            break
        time.sleep(poll)
    print()
    print(format_table(rows))
    for note in notes:
        print(f"note: {note}")
    plots = sorted((run_dir / "reports").glob("*_loss.png"))
    for plot in plots:
        print(f"loss plot: {plot}")
    handoff = run_dir / "handoff.json"
    if handoff.exists():
        print(f"hand-off for the RL stage: {handoff}")
    return 0 if all(r.state.state == "COMPLETED" for r in rows) else 1


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from sftjobs.runs import find_run, list_runs
    from sftjobs.status import collect, format_table

    runs = [find_run(args.run)] if args.run else list_runs()
    rows, notes = collect(runs)
    if args.json:
        print(json.dumps({"steps": [r.to_dict() for r in rows], "notes": notes}, indent=2, default=str))
        return 0
    if not rows and not notes:
        print("no runs yet (sftjobs submit PROFILE starts one)")
        return 0
    print(format_table(rows))
    for note in notes:
        print(f"note: {note}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from sftjobs.runs import find_run, read_manifest
    from sftjobs.status import collect, default_log_step, follow, log_path

    run_dir = find_run(args.run)
    manifest = read_manifest(run_dir)
    step = args.step or default_log_step(run_dir, manifest)
    if step not in manifest["jobs"]:
        raise SftjobsError(f"run {manifest['run_id']} has no step {step!r}; its steps are {', '.join(manifest['jobs'])}.")
    path = log_path(run_dir, manifest, step)
    print(f"==> {path} <==", file=sys.stderr)
    if args.follow:
        def running() -> bool:
            rows, _ = collect([run_dir])
            return any(r.step == step and r.state.live for r in rows)
        for chunk in follow(path, running):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        return 0
    if not path.exists():
        raise SftjobsError(f"step {step} has no log yet ({path}); it has not started. `sftjobs status` shows why.")
    sys.stdout.write(path.read_text(errors="replace"))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from sftjobs import executors
    from sftjobs.runs import find_run, read_manifest, record_event
    from sftjobs.status import collect

    run_dir = find_run(args.run)
    manifest = read_manifest(run_dir)
    rows, _ = collect([run_dir])
    live = [r for r in rows if r.state.live]
    if not live:
        print(f"run {manifest['run_id']}: nothing to cancel (no live step)")
        return 0
    executors.for_manifest(manifest).cancel(run_dir, [r.job_id for r in live])
    record_event(run_dir, "cancelled", steps=[r.step for r in live])
    print(f"run {manifest['run_id']}: cancelled {', '.join(f'{r.step} ({r.job_id})' for r in live)}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from sftjobs.runs import find_run
    from sftjobs.submit import resume

    run_dir = find_run(args.run)
    manifest, resubmitted = resume(run_dir)
    if not resubmitted:
        print(f"run {manifest['run_id']}: every step completed; nothing to resume")
        return 0
    print(f"run {manifest['run_id']}: resubmitted {', '.join(resubmitted)} ({manifest['executor']})")
    for step in resubmitted:
        print(f"  {step:<17} job {manifest['jobs'][step]}")
    if args.wait:
        return wait_for_run(run_dir, 5.0)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftjobs", description="LLaMA-Factory SFT job chains on Slurm or this machine.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profiles", help="list the stage profiles with a one-line summary each")
    p.set_defaults(func=cmd_profiles)

    p = sub.add_parser("render", help="write the run directory that submit would use, without submitting")
    _add_profile_args(p)
    p.add_argument("--out", metavar="DIR", help="where to write (default: <jobs dir>/rendered/<run-id>)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("submit", help="render a run and queue its whole chain (Slurm, or this machine)")
    _add_profile_args(p)
    p.add_argument("--executor", choices=("auto", "slurm", "local", "debug"), default=None,
                   help="default: the profile's resources.executor (auto: slurm if sbatch is on PATH, else local)")
    p.add_argument("--preview", action="store_true", help="print the exact sbatch scripts and dependency graph; submit nothing")
    p.add_argument("--wait", action="store_true", help="block until the chain ends, then print the status table")
    p.add_argument("--poll", type=float, default=5.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="squeue-style table of every run and step (or one RUN)")
    p.add_argument("run", nargs="?", metavar="RUN")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="show (or -f follow) a step's log")
    p.add_argument("run", metavar="RUN")
    p.add_argument("step", nargs="?", metavar="STEP", help="default: the failed step, else the latest started")
    p.add_argument("-f", "--follow", action="store_true")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", help="cancel every live job of a run")
    p.add_argument("run", metavar="RUN")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("resume", help="resubmit the steps of a run that did not complete (training resumes)")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--wait", action="store_true", help="block until the chain ends")
    p.set_defaults(func=cmd_resume)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SftjobsError as exc:
        print(f"sftjobs: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
