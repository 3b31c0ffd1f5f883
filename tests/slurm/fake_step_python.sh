#!/usr/bin/env bash
# Stands in for the step's python in Slurm-side and local tests (launcher.python): the sbatch scripts, the
# dependencies, srun, the launch script and sftjobs' node runtime (a job's steps in order, their own records,
# cancelling the dependants of a failed step) are real; each step itself (tests/slurm/fake_steps.py) records its
# environment and ends at once. FAKE_FAIL_STEP=<step> makes that step fail (as a real step fails, through the
# runtime); FAKE_KILL_JOB=<job> ends that job with exit 1 before the runtime starts (a crash without sftjobs' own
# handler); FAKE_SLEEP=<s> makes each step sleep.
# Called as: fake_step_python.sh -m sftjobs.steps JOB --run-dir DIR
step="$3"; run_dir="$5"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
steps="${SFTJOBS_FAKE_STEPS:-$here/fake_steps.py}"
mkdir -p "$run_dir/fake"
if [ "${FAKE_KILL_JOB:-}" = "$step" ]; then echo "fake crash of job $step" >&2; exit 1; fi
# this checkout's sftjobs, whatever the python has installed
export PYTHONPATH="$(dirname "$(dirname "$(dirname "$steps")")")${PYTHONPATH:+:$PYTHONPATH}"
"${SFTJOBS_FAKE_REAL_PYTHON:-python3}" "$steps" "$@"
code=$?
[ "$code" = 0 ] || exit "$code"
