#!/usr/bin/env bash
# sftjobs step "dry_run" (train) of run golden.
# Generated from templates/step.sh.j2: runs on the node from the run directory alone.
# One job, its steps in order on this job's node: preflight, dry_run, validate_dry_run.
set -euo pipefail
cd /RUN
umask 022
export TORCH_CUDNN_SDPA_DEPRIORITIZED=1
export PYTHONUNBUFFERED=1
export WANDB_DISABLED=true
export HF_DATASETS_CACHE=/BASE/data/.hf_datasets_cache
# Outside Slurm (local executor) use exactly the GPUs the profile asks for, unless the user chose them.
if [ -z "${SLURM_JOB_ID:-}" ] && [ -z "${CUDA_VISIBLE_DEVICES+set}" ]; then
  export CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7
fi
# Distributed environment for the train step's torchrun (as llamafactory-cli reads it: NODE_RANK, not RANK).
export NNODES=1
export NPROC_PER_NODE=8
export NODE_RANK="${SLURM_NODEID:-0}"
if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
else
  MASTER_ADDR=127.0.0.1
fi
export MASTER_ADDR
# The job id only as digits: bash evaluates a variable's text inside $(( )), so "a[$(cmd)]" would run cmd.
job_number="${SLURM_JOB_ID:-$$}"
case "$job_number" in ''|*[!0-9]*) job_number=$$ ;; esac
export MASTER_PORT="$(( 20000 + 10#$job_number % 20000 ))"
export FORCE_TORCHRUN=1
exec /usr/bin/python3 -m sftjobs.steps dry_run --run-dir /RUN
