#!/usr/bin/env bash
# Stands in for the step's python in Slurm-side tests (launcher.python): the sbatch scripts, the
# dependencies, srun and the launch script are real; the step itself records its environment and
# exits at once. FAKE_FAIL_STEP=<step> makes that step fail; FAKE_SLEEP=<s> makes each step sleep.
# Called as: fake_step_python.sh -m sftjobs.steps STEP --run-dir DIR
step="$3"; run_dir="$5"
mkdir -p "$run_dir/fake"
env | grep -E '^(SLURM_|NODE_RANK|NNODES|NPROC_PER_NODE|MASTER_|CUDA_VISIBLE|FORCE_TORCHRUN|HF_)' | sort \
  > "$run_dir/fake/$step.${SLURM_NODEID:-0}.env"
sleep "${FAKE_SLEEP:-0}"
if [ "${FAKE_FAIL_STEP:-}" = "$step" ]; then echo "fake failure in $step" >&2; exit 1; fi
echo "fake step $step done on $(hostname) node ${SLURM_NODEID:-0}"
