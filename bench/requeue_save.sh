#!/usr/bin/env bash
# What a requeue costs with prod's settings, before and after save-at-the-signal, in ONE device call:
#   1. the train step of `sftjobs render prod` (as configs/prod.yaml stands, the per-GPU share of its 8-GPU step:
#      batch.global_size = 2 x GPUs, deepspeed auto for this card) runs through sftjobs' own node runtime
#      (python -m sftjobs.steps train), with prod's save_steps (2000) so no periodic save happens;
#   2. at step SIGNAL_AT it gets USR2, as Slurm's time-limit warning sends it: it finishes the step, saves a complete
#      checkpoint (model, optimizer, scheduler, RNG) and exits. Recorded: the save's seconds, signal -> exit, the
#      checkpoint's size;
#   3. the step is started again and resumes: recorded the seconds to its first new step and the steps trained twice
#      (from trainer_log.jsonl), then it is stopped.
# "before" (periodic saves only): a requeue loses the steps since the last periodic save, on average save_steps / 2
# and at worst save_steps, each at the measured seconds per step. "after": the steps trained twice (at most one).
#
#   bash bench/requeue_save.sh          (repo root on the device; carry .whl and .benchdata; writes $OUT/requeue_$TAG.json)
# Env: SHAPE (qwen2.5-3b) NDATA (400) SIGNAL_AT (12) TAG (gpu) SAVE_STEPS (2000, prod's)
set -u
T0=$(date +%s)
SHAPE=${SHAPE:-qwen2.5-3b}; NDATA=${NDATA:-400}; SIGNAL_AT=${SIGNAL_AT:-12}; TAG=${TAG:-gpu}; SAVE_STEPS=${SAVE_STEPS:-2000}
OUT=${OUT:-/tmp/out}; W=${BENCH_WORK:-/tmp/rq}; REPO=$PWD
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false DISABLE_VERSION_CHECK=1
el() { echo "[requeue t=$(( $(date +%s) - T0 ))s] $*"; }

if [ ! -f /tmp/site/.ok ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.ok || el "pip install FAILED"
fi
export PYTHONPATH=/tmp/site:$REPO PATH=/tmp/site/bin:$PATH
NG=$(nvidia-smi -L | wc -l)
GPU_GIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | sort -n | head -1 | awk '{print int($1/1024)}')
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
[ -f "$W/data/sft.jsonl" ] || python3 bench/make_bench_data.py data .benchdata/tokenizer "$W/data/sft.jsonl" "$NDATA" 2>&1 | tail -1
if [ ! -f "$W/model/config.json" ]; then
  mkdir -p "$W/model" && cp .benchdata/tokenizer/* "$W/model/"
  python3 -c "from sftjobs.io.demo_assets import make_demo_model as m; m('$W/model', [], shape='$SHAPE')" 2>&1 | grep -v Writing
fi
# a 3B checkpoint with its optimizer state is ~45 GB: memory-backed when there is room, else the disk
CK=$W/ckpt; shm=$(df -BG --output=avail /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9); [ "${shm:-0}" -gt 70 ] && CK=/dev/shm/rq_ckpt
RUN=$W/run; rm -rf "$RUN" "$CK"
python3 -m sftjobs render prod --out "$RUN" --set model.source=path --set "model.path=$W/model" \
  --set data.source=path --set "data.path=$W/data/sft.jsonl" --set "data.dir=$W/data_h" \
  --set "resources.gpus_per_node=$NG" --set "batch.global_size=$((2 * NG))" --set "resources.gpu_memory_gib=$GPU_GIB" \
  --set "output_dir=$CK" --set train.logging_steps=1 --set "train.save_steps=$SAVE_STEPS" > "$W/render.log" 2>&1 \
  || { cat "$W/render.log"; exit 1; }
grep -h "memory plan" "$W/render.log"
for step in data model; do
  python3 -m sftjobs.steps $step --run-dir "$RUN" > "$W/$step.log" 2>&1 || { el "$step step FAILED"; tail -20 "$W/$step.log"; exit 1; }
done
el "setup done: $NG x $CARD, checkpoints in $CK"

python3 bench/requeue_probe.py "$RUN" "$CK" "$SIGNAL_AT" "$SAVE_STEPS" "$OUT/requeue_$TAG.json" "$CARD" "$NG"
cp "$W"/train*.log "$OUT/" 2>/dev/null
el "done"
