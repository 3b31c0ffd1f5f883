"""sftjobs command line: profiles, render, submit, status, logs, cancel, resume, demo.

Every user-fixable problem is an SftjobsError: one message on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sftjobs import __version__
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
    from sftjobs.runs import jobs_dir, new_run_id, store_dir

    profile = load_profile(args.profile, args.overrides)
    plan = build_plan(profile, dry_run_first=args.dry_run_first)
    run_id = new_run_id(profile.name)
    out = Path(args.out).absolute() if args.out else jobs_dir() / "rendered" / run_id
    files = render_files(plan_run(profile, plan, out, run_id, base=store_dir()))
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
        return wait_or_detach(manifest["run_id"], prepared.run_dir, args.poll)
    return 0


def wait_or_detach(run_id: str, run_dir: Path, poll: float) -> int:
    """--wait, where Ctrl-C stops the waiting only: the jobs are queued and go on; say how to watch or stop them."""
    try:
        return wait_for_run(run_dir, poll)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; run {run_id} goes on (its jobs are queued). "
              f"Watch it: `sftjobs status {run_id}`, `sftjobs logs {run_id} -f`; "
              f"stop it: `sftjobs cancel {run_id}`.", file=sys.stderr, flush=True)
        return 130


def wait_for_run(run_dir: Path, poll: float) -> int:
    """Block until every step has finished, then print the table, and the loss plot if there is one."""
    import time

    from sftjobs.status import TERMINAL, collect, fit_table

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
    print(fit_table(rows, terminal_width()))
    for note in notes:
        print(f"note: {note}")
    plots = sorted((run_dir / "reports").glob("*_loss.png"))
    for plot in plots:
        print(f"loss plot: {plot}")
    handoff = run_dir / "handoff.json"
    if handoff.exists():
        print(f"hand-off for the RL stage: {handoff}")
    return 0 if all(r.state.state == "COMPLETED" for r in rows) else 1


# squeue -t's short codes for the states a step can be in
STATE_CODES = {"PD": "PENDING", "R": "RUNNING", "CG": "COMPLETING", "CD": "COMPLETED", "CA": "CANCELLED", "F": "FAILED",
               "TO": "TIMEOUT", "OOM": "OUT_OF_MEMORY", "NF": "NODE_FAIL", "PR": "PREEMPTED", "RQ": "REQUEUED",
               "S": "SUSPENDED", "BF": "BOOT_FAIL", "DL": "DEADLINE", "CF": "CONFIGURING"}


def parse_states(value: str | None) -> set[str] | None:
    if value is None:
        return None
    names = set(STATE_CODES.values()) | {"UNKNOWN"}
    wanted = set()
    for item in value.split(","):
        word = item.strip().upper()
        word = STATE_CODES.get(word, word)
        if word not in names:
            raise SftjobsError(f"--state {item.strip()!r} is not a job state. Use Slurm's names or squeue's codes, "
                               f"comma-separated: {', '.join(f'{v} ({k})' for k, v in STATE_CODES.items())}.")
        wanted.add(word)
    return wanted


def select_runs(args: argparse.Namespace) -> tuple[list[Path], int]:
    """The runs a status or list asks about (RUN, or every run of --profile), and how many the store holds."""
    from sftjobs.runs import find_run, list_runs, read_manifest

    runs = list_runs()
    total = len(runs)
    if getattr(args, "run", None):
        return [find_run(args.run)], total
    if getattr(args, "profile", None):
        def profile_of(run: Path) -> str | None:
            try:
                return read_manifest(run).get("profile")
            except SftjobsError:
                return None
        runs = [r for r in runs if profile_of(r) == args.profile]
    return runs, total


def status_view(args: argparse.Namespace, width: int) -> tuple[str, int]:
    """The status screen as text (one --watch frame) and how many runs it shows."""
    import time

    from sftjobs.runs import jobs_dir, read_manifest
    from sftjobs.status import fit_table, format_table

    runs, total = select_runs(args)
    states = parse_states(args.state)
    rows, notes = collect_rows(runs)
    by_run: dict[str, list] = {}
    for row in rows:
        by_run.setdefault(row.run, []).append(row)
    history = bool(args.all or args.run or states)
    shown = {run: run_rows for run, run_rows in by_run.items() if history or any(r.state.live for r in run_rows)}
    if states:
        shown = {run: [r for r in rs if r.state.state.split()[0] in states] for run, rs in shown.items()}
        shown = {run: rs for run, rs in shown.items() if rs}
    rows = [r for rs in shown.values() for r in rs]
    notes = [n for n in notes if any(n.startswith(f"run {run}:") for run in shown) or not n.startswith("run ")]
    where = f"{total} run{'s' if total != 1 else ''} in {jobs_dir()}"
    if not total:
        return f"no runs yet in {jobs_dir()} (sftjobs submit PROFILE starts one)", 0
    if not rows:
        scope = f" of profile {args.profile}" if getattr(args, "profile", None) else ""
        what = f"no live run{scope}" if not history else f"no run{scope} has a step in {args.state}" if states else f"no run{scope}"
        hint = "; `sftjobs status --all` shows the finished ones" if not history else ""
        return f"{what} among the {where}{hint}", 0
    if args.wide:
        text = format_table(rows)
    else:
        headers = {}
        for run_dir in runs:
            try:
                m = read_manifest(run_dir)
            except SftjobsError:
                continue
            started = time.strftime("%m-%d %H:%M", time.localtime(m.get("submitted", 0)))
            headers[m["run_id"]] = f"run {m['run_id']}  profile {m.get('profile')}  {m.get('executor')}  started {started}"
        text = fit_table(rows, width, headers)
    more = "" if history or len(shown) == total else f" (--all shows the {total - len(shown)} finished)"
    lines = [f"{len(shown)} of the {where}{more}", text] + [f"note: {n}" for n in notes]
    return "\n".join(lines), len(shown)


def collect_rows(runs: list[Path]):
    from sftjobs.status import collect

    return collect(runs)


def terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size((80, 24)).columns


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from sftjobs.runs import jobs_dir

    if args.count is not None and args.watch is None:
        raise SftjobsError(f"--count {args.count} goes with --watch: e.g. `sftjobs status --watch 5 --count {args.count}`.")
    if args.json and args.watch is not None:
        raise SftjobsError("--json and --watch do not go together: --json prints once; poll it, or drop --json.")
    if args.json:
        runs, _ = select_runs(args)
        rows, notes = collect_rows(runs)
        states = parse_states(args.state)
        if states:
            rows = [r for r in rows if r.state.state.split()[0] in states]
        print(json.dumps({"jobs_dir": str(jobs_dir()), "steps": [r.to_dict() for r in rows], "notes": notes},
                         indent=2, default=str))
        return 0
    if args.watch is None:
        print(status_view(args, terminal_width())[0])
        return 0
    return watch(args)


def watch(args: argparse.Namespace) -> int:
    """--watch [SECONDS]: redraw in place (as watch(1) and squeue -i do) until Ctrl-C, or --count frames."""
    import time

    interval = args.watch
    if interval <= 0:
        raise SftjobsError(f"--watch {interval:g}: the interval must be a positive number of seconds, e.g. --watch 5.")
    if args.count is not None and args.count < 1:
        raise SftjobsError(f"--count {args.count}: give at least 1 frame.")
    tty = sys.stdout.isatty()
    frame = 0
    try:
        while True:
            text, _ = status_view(args, terminal_width())
            head = f"every {interval:g}s: sftjobs status  {time.strftime('%H:%M:%S')}  (Ctrl-C stops)"
            # home + clear to the end of the screen: the frame is redrawn where it was, no scrolling
            sys.stdout.write(("\x1b[H\x1b[J" if tty else "") + head + "\n" + text + "\n")
            sys.stdout.flush()
            frame += 1
            if args.count is not None and frame >= args.count:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


def cmd_list(args: argparse.Namespace) -> int:
    import time

    from sftjobs.runs import jobs_dir, read_manifest
    from sftjobs.status import run_progress, run_state

    runs, _ = select_runs(args)
    if not runs:
        print(f"no runs yet in {jobs_dir()} (sftjobs submit PROFILE starts one)")
        return 0
    rows, _ = collect_rows(runs)
    by_run: dict[str, list] = {}
    for row in rows:
        by_run.setdefault(row.run, []).append(row)
    table = [("RUN", "PROFILE", "STATE", "STARTED", "PROGRESS")]
    for run_dir in runs:
        try:
            m = read_manifest(run_dir)
        except SftjobsError:
            continue
        run_rows = by_run.get(m["run_id"], [])
        started = time.strftime("%m-%d %H:%M", time.localtime(m.get("submitted", 0)))
        table.append((m["run_id"], str(m.get("profile")), run_state(run_rows), started, run_progress(run_rows)))
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    print(f"runs in {jobs_dir()}")
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    import shutil
    import time

    from sftjobs.runs import find_run, jobs_dir, list_runs
    from sftjobs.status import collect

    if args.older_than < 0:
        raise SftjobsError(f"--older-than {args.older_than:g}: give a number of days >= 0, e.g. --older-than 7.")
    every = list_runs()
    named = [find_run(ref) for ref in args.runs]
    candidates = named or [r for r in every if time.time() - _submitted(r) >= args.older_than * 86400]
    rows, _ = collect(candidates)
    live = {r.run for r in rows if r.state.live}
    if named and live & {p.name for p in named}:
        busy = sorted(live & {p.name for p in named})
        raise SftjobsError(f"run {', '.join(busy)} is still live: clean never removes a live run. "
                           f"`sftjobs cancel {busy[0]}` first, or wait for it.")
    doomed = [r for r in candidates if r.name not in live]
    kept = [r for r in every if r not in doomed]
    kept_outputs = set()
    for r in kept:
        kept_outputs |= set(_outputs(r))
    if not doomed:
        print(f"nothing to clean in {jobs_dir()} (no finished run older than {args.older_than:g} days)")
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for run_dir in doomed:
        targets = [run_dir]
        note = ""
        if args.checkpoints:
            outputs = [Path(o) for o in _outputs(run_dir) if Path(o).exists()]
            shared = [o for o in outputs if str(o) in kept_outputs]
            targets += [o for o in outputs if str(o) not in kept_outputs]
            if shared:
                note = f" (kept {', '.join(map(str, shared))}: another run uses it)"
        elif any(Path(o).exists() for o in _outputs(run_dir)):
            note = " (checkpoints kept; --checkpoints removes them)"
        size = sum(_size(t) for t in targets)
        if not args.dry_run:
            for target in targets:
                shutil.rmtree(target, ignore_errors=True)
        print(f"{verb} {run_dir.name}: {', '.join(str(t) for t in targets)}, {size / 2**20:.1f} MiB{note}")
    if args.dry_run:
        print("nothing removed (--dry-run)")
    return 0


def _submitted(run_dir: Path) -> float:
    from sftjobs.runs import read_manifest

    try:
        return float(read_manifest(run_dir).get("submitted") or 0)
    except SftjobsError:
        return 0.0


def _outputs(run_dir: Path) -> list[str]:
    """The checkpoint folders a run wrote (plan.json's output_dir and its dry run's)."""
    import json

    try:
        paths = json.loads((run_dir / "plan.json").read_text())["paths"]
    except (OSError, ValueError, KeyError):
        return []
    return [paths[k] for k in ("output_dir", "dry_run_output_dir") if paths.get(k)]


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def cmd_logs(args: argparse.Namespace) -> int:
    from sftjobs.runs import find_run, read_manifest
    from sftjobs.status import default_log_step, fold_progress, log_path

    run_dir = find_run(args.run)
    manifest = read_manifest(run_dir)
    step = args.step or default_log_step(run_dir, manifest)
    if step not in manifest["jobs"]:
        raise SftjobsError(f"run {manifest['run_id']} has no step {step!r}; its steps are {', '.join(manifest['jobs'])}.")
    if args.follow:
        return follow_chain(run_dir, manifest, step, args.raw, chain=args.step is None)
    path = log_path(run_dir, manifest, step)
    print(f"==> {path} <==", file=sys.stderr)
    if not path.exists():
        raise SftjobsError(f"step {step} has no log yet ({path}); it has not started. `sftjobs status` shows why.")
    with open(path, errors="replace", newline="") as handle:  # newline="": \r is not read as a line end
        text = handle.read()
    sys.stdout.write(text if args.raw else fold_progress(text))
    return 0


def follow_chain(run_dir: Path, manifest: dict, first: str, raw: bool, chain: bool) -> int:
    """logs -f: tail the step's log while it runs; then (no STEP named) go on to the next step of the chain, in the
    manifest's order, until no step of the run is live. A step that never started (its chain stopped) is skipped."""
    import time

    from sftjobs.status import ProgressFolder, collect, follow, log_path

    steps = list(manifest["jobs"])
    order = steps[steps.index(first):] if chain else [first]
    tty = sys.stdout.isatty()

    def state_of(step: str):
        rows, _ = collect([run_dir])
        row = next((r for r in rows if r.step == step), None)
        return row, any(r.state.live for r in rows)

    # the steps of one job write one log: it is followed once, while any of them is live
    logs: dict[Path, list[str]] = {}
    for step in order:
        logs.setdefault(log_path(run_dir, manifest, step), []).append(step)
    for path, sharing in logs.items():
        step = sharing[0]
        while True:  # wait for the step to start, or for the chain to end without it
            row, chain_live = state_of(step)
            started = row is not None and row.state.state.split()[0] != "PENDING"
            if started or path.exists() or not chain_live:
                break
            time.sleep(1.0)
        if not (started or path.exists()):
            continue
        print(f"==> {path} <==", file=sys.stderr, flush=True)
        folder = ProgressFolder(tty)

        def live(sharing=sharing) -> bool:
            rows, _ = collect([run_dir])
            return any(r.state.live for r in rows if r.step in sharing)

        for chunk in follow(path, live):
            sys.stdout.write(chunk if raw else folder.feed(chunk))
            sys.stdout.flush()
        if not raw:
            sys.stdout.write(folder.close())
            sys.stdout.flush()
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    import time

    from sftjobs import executors
    from sftjobs.runs import find_run, read_manifest, record_event
    from sftjobs.status import collect
    from sftjobs.submit import read_json_quiet

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
    # a training step saves the optimizer step it is on before it exits (SIGTERM is passed on to it): wait until
    # every job has ended, so that `resume` right after this finds nothing live and the newest checkpoint complete
    cancelled = {r.step for r in live}
    deadline = time.monotonic() + args.timeout
    while True:
        rows, _ = collect([run_dir])
        still = [r for r in rows if r.state.live and r.step in cancelled]
        if not still or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    for step in sorted(cancelled):
        record = read_json_quiet(run_dir / "reports" / "status" / f"{step}.json")
        if record.get("state") == "STOPPED":
            print(f"  {step}: {record.get('message')}")
    if still:
        print(f"  still ending after {args.timeout:.0f} s: {', '.join(f'{r.step} ({r.state.state})' for r in still)}; "
              "`sftjobs status` shows when they are gone")
        return 1
    print("  every cancelled job has ended; `sftjobs resume RUN` continues from the newest complete checkpoint")
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
        return wait_or_detach(manifest["run_id"], run_dir, 5.0)
    return 0


def build_parser() -> argparse.ArgumentParser:
    # every command takes --jobs-dir, before or after its name
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--jobs-dir", "--store", dest="jobs_dir", metavar="DIR", default=argparse.SUPPRESS,
                       help="where runs live (default: $SFTJOBS_JOBS_DIR, else $XDG_DATA_HOME/sftjobs/jobs, i.e. "
                            "~/.local/share/sftjobs/jobs); relative profile paths resolve against its parent folder")
    parser = argparse.ArgumentParser(prog="sftjobs", description="LLaMA-Factory SFT job chains on Slurm or this machine.",
                                     parents=[store])
    parser.add_argument("--version", "-V", action="version", version=f"sftjobs {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profiles", parents=[store], help="list the stage profiles with a one-line summary each")
    p.set_defaults(func=cmd_profiles)

    p = sub.add_parser("render", parents=[store], help="write the run directory that submit would use, without submitting")
    _add_profile_args(p)
    p.add_argument("--out", metavar="DIR", help="where to write (default: <jobs dir>/rendered/<run-id>)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("submit", parents=[store], help="render a run and queue its whole chain (Slurm, or this machine)")
    _add_profile_args(p)
    p.add_argument("--executor", choices=("auto", "slurm", "local", "debug"), default=None,
                   help="default: the profile's resources.executor (auto: slurm if sbatch is on PATH, else local)")
    p.add_argument("--preview", action="store_true", help="print the exact sbatch scripts and dependency graph; submit nothing")
    p.add_argument("--wait", action="store_true", help="block until the chain ends, then print the status table")
    p.add_argument("--poll", type=float, default=5.0, metavar="SECONDS",
                   help="with --wait: seconds between state checks (default 5)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", parents=[store], help="squeue-style table of the live runs (or one RUN, or --all)")
    p.add_argument("run", nargs="?", metavar="RUN", help="a run id, a unique prefix of one, a run directory, or 'last'")
    p.add_argument("--all", "-a", action="store_true", help="finished runs too (default: the live ones)")
    p.add_argument("--state", "-t", metavar="STATES",
                   help="only steps in these states, comma-separated, Slurm's names or squeue's codes (PD,R,CD,CA,F)")
    p.add_argument("--profile", "-p", metavar="PROFILE", help="only runs of this profile")
    p.add_argument("--watch", "-i", nargs="?", type=float, const=5.0, default=None, metavar="SECONDS",
                   help="redraw in place every SECONDS (default 5) until Ctrl-C")
    p.add_argument("--count", type=int, default=None, metavar="N", help="with --watch: stop after N frames")
    p.add_argument("--wide", "-l", action="store_true", help="one table, every column, nothing cut to the terminal")
    p.add_argument("--json", action="store_true",
                   help="machine-readable output: every step of the selected runs, finished ones included")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("list", parents=[store], help="the runs, one line each: run, profile, state, started, progress")
    p.add_argument("--profile", "-p", metavar="PROFILE", help="only runs of this profile")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("clean", parents=[store],
                       help="remove finished run directories (never a live run's; checkpoints only with --checkpoints)")
    p.add_argument("runs", nargs="*", metavar="RUN", help="these runs (default: every finished run older than --older-than)")
    p.add_argument("--older-than", type=float, default=7.0, metavar="DAYS", help="default 7")
    p.add_argument("--checkpoints", action="store_true",
                   help="also remove the runs' checkpoint folders (output_dir) that no kept run uses")
    p.add_argument("--dry-run", "-n", action="store_true", help="say what would be removed, remove nothing")
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("logs", parents=[store], help="show (or -f follow) a step's log, progress bars as one line each")
    p.add_argument("run", metavar="RUN", help="a run id, a unique prefix of one, a run directory, or 'last'")
    p.add_argument("step", nargs="?", metavar="STEP", help="default: the failed step, else the latest started")
    p.add_argument("-f", "--follow", action="store_true",
                   help="follow the log as it grows and go on to the next step's until the chain ends")
    p.add_argument("--raw", action="store_true",
                   help="the log as written, carriage-return progress updates included (default: their last state)")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", parents=[store], help="cancel every live job of a run and wait until they have ended "
                       "(a training step first saves the optimizer step it is on)")
    p.add_argument("run", metavar="RUN", help="a run id, a unique prefix of one, a run directory, or 'last'")
    p.add_argument("--timeout", type=float, default=180.0, metavar="SECONDS",
                   help="how long to wait for the jobs to end (default 180; exit 1 if some are still ending)")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("resume", parents=[store], help="resubmit the steps of a run that did not complete (training resumes)")
    p.add_argument("run", metavar="RUN", help="a run id, a unique prefix of one, a run directory, or 'last'")
    p.add_argument("--wait", action="store_true", help="block until the chain ends, then print the status table")
    p.set_defaults(func=cmd_resume)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "jobs_dir", None) is not None:
            from sftjobs.runs import set_jobs_dir

            set_jobs_dir(args.jobs_dir)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so that a reader that has gone is a BrokenPipeError caught below
        return code
    except SftjobsError as exc:
        print(f"sftjobs: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `sftjobs status | head`: the reader has gone; stop quietly, as cat and ls do
        _quiet_stdout()
        return 141


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not raise a second BrokenPipeError."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
