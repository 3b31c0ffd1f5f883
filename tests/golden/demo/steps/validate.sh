#!/usr/bin/env bash
# sftjobs step "validate" (validate) of run golden.
# Generated from templates/step.sh.j2: runs on the node from the run directory alone.
set -euo pipefail
cd /RUN
umask 022
export PYTHONUNBUFFERED=1
export WANDB_DISABLED=true
export HF_DATASETS_CACHE=/BASE/data/demo/.hf_datasets_cache
exec /usr/bin/python3 -m sftjobs.steps validate --run-dir /RUN
