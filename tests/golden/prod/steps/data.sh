#!/usr/bin/env bash
# sftjobs step "data" (data) of run golden.
# Generated from templates/step.sh.j2: runs on the node from the run directory alone.
set -euo pipefail
cd /RUN
umask 022
export TORCH_CUDNN_SDPA_DEPRIORITIZED=1
export PYTHONUNBUFFERED=1
export WANDB_DISABLED=true
export HF_DATASETS_CACHE=/BASE/data/.hf_datasets_cache
exec /usr/bin/python3 -m sftjobs.steps data --run-dir /RUN
