#!/usr/bin/env bash
# The GPU benchmark, in ONE device call: the items of bench/items.txt named on the command line, on the same
# synthetic ARPO-shaped data (bench/make_bench_data.py), model shape and GPUs. Writes $OUT/prod_$TAG.json and
# $OUT/summary_$TAG.md (bench/summarize_prod.py; copy them to bench/results/) and $OUT/bench_$TAG.tgz (logs).
#
#   bash bench/bench_prod.sh "A P fast chain"          (repo root; carry .whl and .benchdata; bench/README.md)
#
# Items run in the order given, each only while the time budget (BUDGET_S from the start) leaves room for it.
# ITEM#N runs a gpu item again as out_<ITEM>_rN (run-to-run noise in one call).
# A gpu item is `sftjobs render PROFILE` with the item's --set overrides, then the train step's own command
# (torchrun -m sftjobs.trainer.entry with the profile's speed.* switches, launcher.setup first) with the step timer
# passed in as a callback (bench/train_command.py, bench/step_timer.py), train.max_steps = the item's STEPS; the
# first WARM steps are warm-up, the rest are measured. The chain item is `sftjobs submit` itself.
#
# Env: STEPS_<ITEM> / LIMIT_<ITEM> (override items.txt's), PROFILE_ITEM (out names, e.g. "P fast_r2": torch.profiler
#      over step PROFILE_STEP (6) on rank 0: out_NAME/profile_rank0.txt, trace_rank0.json.gz, gaps_rank0.txt),
#      SHAPE (qwen2.5-3b) NDATA (2000) BUDGET_S (560) TAG (gpu) DRY_SAMPLES (1000) WARM (3)
set -u
T0=$(date +%s)
ITEMS="${1:-A P fast chain}"
SHAPE=${SHAPE:-qwen2.5-3b}; NDATA=${NDATA:-2000}; BUDGET_S=${BUDGET_S:-560}; TAG=${TAG:-gpu}
DRY_SAMPLES=${DRY_SAMPLES:-1000}; WARM=${WARM:-3}
OUT=${OUT:-/tmp/out}; W=${BENCH_WORK:-/tmp/bp}; REPO=$PWD
mkdir -p "$OUT" "$W"
# a warm machine keeps $W: drop the last invocation's results so the summary lists only this one's items
rm -rf "$W"/out_* "$W"/render_* "$W"/chain_* "$W"/skipped.txt
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DISABLE_VERSION_CHECK=1 BENCH_EXIT_AT_END=1
el() { echo "[bench t=$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }

# ------------------------------------------------------------------ setup (idempotent on a warm machine)
el "setup: items '$ITEMS', shape $SHAPE, $NDATA rows, budget ${BUDGET_S}s"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv | tee "$W/gpus.csv"
nvidia-smi topo -m > "$W/topo.txt" 2>&1 || true
NG=$(nvidia-smi -L | wc -l)
# the card's memory in GiB, for prod's deepspeed: auto (resources.gpu_memory_gib)
GPU_GIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | sort -n | head -1 | awk '{print int($1/1024)}')
if [ ! -f /tmp/site/.ok ] && [ -z "${BENCH_SKIP_PIP:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.ok || el "pip install FAILED"
fi
[ -z "${BENCH_SKIP_PIP:-}" ] && export PYTHONPATH=/tmp/site:$REPO PATH=/tmp/site/bin:$PATH
el "wheels installed; $NG GPU(s)"
case " $ITEMS " in *" A "*|*" A#"*)  # ZeRO-Offload's cpu_adam is JIT-built by DeepSpeed (~40 s): start it now
  (python3 -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load(); print('cpu_adam built')" \
    > "$W/cpu_adam_build.log" 2>&1) & ;;
esac
[ -f "$W/data/sft.jsonl" ] || python3 bench/make_bench_data.py data .benchdata/tokenizer "$W/data/sft.jsonl" "$NDATA" \
  2>&1 | grep -v -i warn
mkdir -p "$W/data_h" && ln -sf "$W/data/sft.jsonl" "$W/data_h/arpo_sft_54k.jsonl"
if [ ! -f "$W/model/config.json" ]; then  # sftjobs' own synthetic model code, around the benchmark's tokenizer
  mkdir -p "$W/model" && cp .benchdata/tokenizer/* "$W/model/"
  python3 -c "from sftjobs.io.demo_assets import make_demo_model as m; m('$W/model', [], shape='$SHAPE')" 2>&1 | grep -v Writing
fi
python3 bench/probe_gpu.py --peak-only "$W/peak.json" 2>&1 | tail -1
# Which SDPA kernel runs for a causal bf16 GQA call, by default and with prod's launcher.setup environment
{ echo "default: $(python3 bench/probe_gpu.py --sdpa-op 2>/dev/null | tail -1)"
  echo "with TORCH_CUDNN_SDPA_DEPRIORITIZED=1: $(TORCH_CUDNN_SDPA_DEPRIORITIZED=1 python3 bench/probe_gpu.py --sdpa-op 2>/dev/null | tail -1)"
} | tee "$W/sdpa_backend.txt"
el "setup done"

COMMON=(--set model.source=path --set "model.path=$W/model" --set data.source=path --set "data.path=$W/data/sft.jsonl"
        --set "data.dir=$W/data_h" --set "resources.gpus_per_node=$NG" --set train.logging_steps=1
        --set train.include_num_input_tokens_seen=non_padding --set train.save_steps=100000 --set train.plot_loss=false)
PORT=29611

# item NAME: its line of bench/items.txt as NAME WHERE PROFILE STEPS LIMIT OVERRIDES (tab-separated)
item() { awk -F' [|] ' -v n="$1" '$1 == n { print $1 "\t" $2 "\t" $3 "\t" $4 "\t" $5 "\t" $6; exit }' bench/items.txt; }
# sets OVERRIDES ARRAY: the item's overrides as --set arguments (@FILE: the file's KEY=VALUE lines)
sets() { local -n _arr=$2; _arr=(); local o line
  for o in $1; do
    [ "$o" = - ] && continue
    if [ "${o:0:1}" = @ ]; then
      while IFS= read -r line; do [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue; _arr+=(--set "$line"); done < "${o:1}"
    else o=${o//\{GPUS2\}/$((2 * NG))}; _arr+=(--set "${o//\{GPU_GIB\}/$GPU_GIB}"); fi
  done; }

# lfrun NAME PROFILE LIMIT STEPS [--set k=v ...]
lfrun() {
  local name=$1 profile=$2 limit=$3 steps=$4; shift 4
  local need=$(( limit < 60 ? limit : 60 ))
  if [ "$(left)" -lt "$need" ]; then el "skip $name: $(left)s left"; echo "$name skipped (time)" >> "$W/skipped.txt"; return; fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  local od="$W/out_$name" rd="$W/render_$name" envs=""; rm -rf "$od" "$rd"; mkdir -p "$od"
  case " ${PROFILE_ITEM:-} " in *" $name "*) envs="BENCH_PROFILE_STEP=${PROFILE_STEP:-6}" ;; esac  # torch.profiler, rank 0
  python3 -m sftjobs render "$profile" --out "$rd" "${COMMON[@]}" --set "output_dir=$od/ckpt" \
    --set "train.max_steps=$steps" --set "train.tokenized_path=$W/tok_$profile" "$@" > "$od/render.log" 2>&1 \
    || { el "$name: render FAILED"; cat "$od/render.log"; return; }
  cp "$rd/llamafactory/train.yaml" "$od/train.yaml"; [ -f "$rd/deepspeed.json" ] && cp "$rd/deepspeed.json" "$od/"
  python3 bench/train_command.py "$rd" "$NG" "$PORT" > "$od/command.sh" || { el "$name: command FAILED"; return; }
  el "run $name ($profile) on $NG GPU(s), $steps steps, limit ${limit}s: $(tail -1 "$od/command.sh")"
  nvidia-smi --query-gpu=timestamp,index,memory.used,utilization.gpu,power.draw --format=csv,noheader -l 2 > "$od/smi.csv" 2>/dev/null &
  local smi=$!
  env $envs BENCH_OUT="$od" setsid bash "$od/command.sh" > "$od/train.log" 2>&1 &
  local tr=$!
  ( sleep "$limit"; kill -TERM -$tr 2>/dev/null; sleep 10; kill -KILL -$tr 2>/dev/null ) &
  local wd=$!
  wait $tr; local rc=$?
  kill $wd 2>/dev/null; wait $wd 2>/dev/null; kill -KILL -$tr 2>/dev/null; kill $smi 2>/dev/null; wait $smi 2>/dev/null
  PORT=$((PORT + 1))
  el "$name rc=$rc"; echo "$rc" > "$od/rc"
  [ -f "$od/trace_rank0.json.gz" ] && python3 bench/trace_gaps.py "$od/trace_rank0.json.gz" "$od/gaps_rank0.txt" | head -45
  grep -E "\[bench\]|\[sftjobs train\]|Error|error:|Traceback|OutOfMemory|out of memory|Killed|[Ll]iger|neat|checkpointing" "$od/train.log" \
    | grep -v "^\s*$" | tail -25
  grep -h "memory plan" "$od/render.log"
  sleep 2
}

chain() {
  if [ "$(left)" -lt 150 ]; then el "skip chain: $(left)s left"; echo "chain skipped (time)" >> "$W/skipped.txt"; return; fi
  local limit=${LIMIT_chain:-$1}; [ "$limit" -gt "$(( $(left) - 15 ))" ] && limit=$(( $(left) - 15 ))
  local ck=$W/ckpt; local shm_free=$(df -BG --output=avail /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)
  [ "${shm_free:-0}" -gt 120 ] && ck=/dev/shm/bench_ckpt   # a 3B checkpoint with optimizer state is ~45 GB
  export SFTJOBS_JOBS_DIR=$W/jobs; rm -rf "$SFTJOBS_JOBS_DIR" "$ck" "$W/data_chain"
  el "chain: sftjobs submit prod --dry-run-first (dry run $DRY_SAMPLES samples), limit ${limit}s, checkpoints in $ck"
  python3 -m sftjobs submit prod --dry-run-first --executor local \
    --set model.source=synthetic --set "model.synthetic_shape=$SHAPE" --set "model.local_dir=$W/model" \
    --set data.source=path --set "data.path=$W/data/sft.jsonl" --set "data.dir=$W/data_chain" \
    --set "output_dir=$ck/prod" --set "resources.gpus_per_node=$NG" --set "dry_run.max_samples=$DRY_SAMPLES" \
    --set "resources.gpu_memory_gib=$GPU_GIB" --set train.include_num_input_tokens_seen=non_padding \
    > "$W/chain_submit.log" 2>&1
  cat "$W/chain_submit.log"
  local run; run=$(awk '/^run /{print $2; exit}' "$W/chain_submit.log")
  [ -n "$run" ] || { el "chain: submit FAILED"; return; }
  echo "$run" > "$W/chain_run_id"
  python3 - "$run" "$limit" <<'EOF'
import json, subprocess, sys, time
run, limit = sys.argv[1], float(sys.argv[2]); t0 = time.time(); last = None
while time.time() - t0 < limit:
    out = subprocess.run([sys.executable, "-m", "sftjobs", "status", run, "--json"], capture_output=True, text=True).stdout
    try:
        steps = {s["step"]: s["state"] for s in json.loads(out)["steps"]}
    except Exception:
        steps = {}
    if steps != last:
        print(f"[chain t={time.time() - t0:.0f}s] {steps}", flush=True); last = steps
    if steps.get("validate_dry_run") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") or \
            any(v == "FAILED" for v in steps.values()) or steps.get("train") == "RUNNING":
        break
    time.sleep(3)
EOF
  python3 -m sftjobs cancel "$run" 2>&1 | tail -2
  sleep 3
  python3 -m sftjobs status "$run" | tee "$W/chain_status.txt"
  local dlog; dlog=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['paths']['dry_run_output_dir'])" "$W/jobs/$run/plan.json" 2>/dev/null)
  [ -f "$dlog/trainer_log.jsonl" ] && cp "$dlog/trainer_log.jsonl" "$W/chain_trainer_log.jsonl"
  el "chain done"
}

for spec in $ITEMS; do
  rep=""; name=${spec%#*}; case $spec in *"#"*) rep="_r${spec##*#}" ;; esac  # ITEM#N: a repeat, out_<name>_rN
  IFS=$'\t' read -r _ where profile steps limit overrides <<< "$(item "$name")"
  case ${where:-} in
    gpu) sets "$overrides" XS; var=${name//[^A-Za-z0-9_]/_}; sv=STEPS_$var; lv=LIMIT_$var
         [ "$name" = A ] && for i in $(seq 60); do grep -q "cpu_adam built\|Error" "$W/cpu_adam_build.log" 2>/dev/null && break; sleep 2; done
         lfrun "$name$rep" "$profile" "${!lv:-$limit}" "${!sv:-$steps}" "${XS[@]}" ;;
    chain) chain "$limit" ;;
    device|cpu) el "$name is a script of its own: $overrides (bench/README.md)" ;;
    *) el "unknown item $spec (bench/items.txt)" ;;
  esac
done

el "summarize"
python3 bench/summarize_prod.py "$W" "$OUT/prod_$TAG.json" "$OUT/summary_$TAG.md" "$WARM" 2>&1 | tail -60
cd "$W" && tar czf "$OUT/bench_$TAG.tgz" --exclude='*.safetensors' gpus.csv topo.txt peak.json skipped.txt \
  cpu_adam_build.log sdpa_backend.txt data/sft.jsonl.stats.json out_*/timing_rank*.json out_*/smi.csv out_*/train.log \
  out_*/train.yaml out_*/command.sh out_*/deepspeed.json out_*/rc out_*/profile_rank0.txt out_*/gaps_rank0.txt \
  out_*/trace_rank0.json.gz chain_* jobs/*/plan.json jobs/*/logs jobs/*/reports jobs/*/monitor jobs/*/llamafactory \
  jobs/*/deepspeed.json jobs/*/handoff.json 2>/dev/null
ls -la "$OUT"
el "all done"
