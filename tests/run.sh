#!/usr/bin/env bash
# The test command (README, .ci/run): set up the venv with every extra, start the real Slurm test
# cluster (root, Debian 12), run every tier. pytest's "no tests collected" (exit 5) is a failure here.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[train,test,track]'
if [ "$(id -u)" = 0 ]; then
  bash tests/slurm/start-slurm.sh
  export SFTJOBS_REQUIRE_SLURM=1   # a cluster that did not come up fails the Slurm tests instead of skipping them
else
  echo "not root: the Slurm test cluster cannot be started here; the slurm tier will skip" >&2
fi
set +e
.venv/bin/python -m pytest "$@"
code=$?
set -e
if [ "$code" = 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$code"
