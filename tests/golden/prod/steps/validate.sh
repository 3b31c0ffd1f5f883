#!/usr/bin/env bash
# sftjobs step "validate" (validate) of run golden.
# Generated from templates/step.sh.j2: runs on the node from the run directory alone.
set -euo pipefail
cd /RUN
umask 022
export TORCH_CUDNN_SDPA_DEPRIORITIZED=1
export PYTHONUNBUFFERED=1
export WANDB_DISABLED=true
export HF_DATASETS_CACHE=/BASE/data/.hf_datasets_cache
# Outside Slurm (local executor) use exactly the GPUs the profile asks for, unless the user chose them.
if [ -z "${SLURM_JOB_ID:-}" ] && [ -z "${CUDA_VISIBLE_DEVICES+set}" ]; then
  export CUDA_VISIBLE_DEVICES=0
fi
exec /usr/bin/python3 -m sftjobs.steps validate --run-dir /RUN
