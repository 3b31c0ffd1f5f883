#!/usr/bin/env bash
# The prod benchmark, in ONE device call: the plan's prod config (A) against sftjobs' prod (S), on the same
# synthetic ARPO-shaped data, model shape and GPUs; plus the fast profile, optional experiments, and the prod
# chain's dry run through sftjobs itself. Writes $OUT/prod_$TAG.json (copy it to bench/results/).
#
#   bash bench/bench_prod.sh "nccl A S fast chain"          (repo root; carry .whl and .benchdata)
#
# Items run in the order given, each only while the time budget (BUDGET_S from the start) leaves room for it:
#   nccl     NCCL bus bandwidth between the GPUs (bench/nccl_bw.py)
#   attn     per-sample attention of one layer on packs: sftjobs' split, all-varlen runs, SDPA per sample (probe_gpu.py --attn)
#   gputest  pytest -m gpu: the GPU-only tests (varlen runs against SDPA per sample: outputs, gradients, a Qwen2 model;
#            a sample split over two GPUs against the whole sample)
#   probe    single-GPU plain-PyTorch probes (bench/probe_gpu.py: compute floor, memory without recompute)
#   A        the plan's config: `sftjobs render prod` + bench/plan_config.sets (ZeRO-3 + CPU offload, bs1 x ga2)
#   P        `sftjobs render prod` as configs/prod.yaml stands (deepspeed auto for this card's memory, balanced ranks),
#            with batch.global_size = 2 x GPUs: the per-GPU work of an 8-GPU prod step (bs 1 x ga 2 per GPU)
#            (configs/prod.yaml: speed.pack_rank_samples, skip_idle_micro_steps, split_long_samples, i.e. BENCH_PACK=1
#            BENCH_SKIP_IDLE=1 BENCH_SPLIT=1; from session 5 on)
#   Pnoskip  P with packing only (session 4's P)
#   Pskip    Pnoskip with speed.skip_idle_micro_steps (micro-steps empty on every GPU run no forward or backward)
#   Psplit   Pskip with speed.split_long_samples (a step's longest sample split over a GPU pair, attention across
#            it): the same as P since session 5
#   Pcudnn   P with single packed samples through cuDNN's attention, padded to a multiple of CUDNN_BUCKET (256)
#   Pslice   P with per-sample attention's q/k/v sliced under autograd (sessions 1-6), not one node whose backward
#            fills each sample's slice (BENCH_SLICE_BACKWARD=1)
#   Pflce    P with only Liger's fused linear cross-entropy (RMSNorm, RoPE, SwiGLU as transformers has them):
#            less CPU per step (session 7 call 1: 11,132 vs P 12,088, slower)
#   Ploop    P with every packed sample through SDPA, no varlen calls (session 3's P)
#   Pb       P with balanced ranks but without packing each GPU's samples (session 2's P)
#   Ppad     Pb without sftjobs' unpadded one-row batches (LLaMA-Factory pads to a multiple of 8 -> L x L mask)
#   S        `sftjobs render prod` + bench/prod_proposal.sets (session 1's proposal: ZeRO-2, no balancing)
#   fast     `sftjobs render fast` as configs/fast.yaml stands: neat_packing + Liger, speed.per_sample_attention
#            (SDPA per sample, runs of short samples in one varlen call) with speed.cudnn_attention_bucket 256
#            (BENCH_CUDNN_ATTN: the single samples on cuDNN, padded; CUDNN_BUCKET sets it), deepspeed auto
#            (recompute only where needed)
#   fastcudnn the same as fast (session 6's name for it, before fast.yaml turned cuDNN on)
#   fastflash fast with the single samples on SDPA's flash kernel (sessions 3-5's fast)
#   fastloop fastflash with every packed sample through SDPA, no varlen calls (session 3's fast)
#   fastslice fast with q/k/v sliced under autograd (sessions 1-6; BENCH_SLICE_BACKWARD=1)
#   fastflce fast with only Liger's fused linear cross-entropy (prepared in session 6, not run yet)
#   fastmask fast with LLaMA-Factory's SDPA 4D block-diagonal mask (no per-sample attention), ZeRO-2 + recompute
#   fastseg  fast on ZeRO-2 with recompute (sessions 1-3's fast)
#   fastnr   fastseg without gradient checkpointing (session 3 call 1)
#   SB       S + sftjobs' speed.balance_ranks (each step's samples spread over the GPUs by length; ZeRO-2: rounds)
#   S1B      SB on ZeRO-1 (bench/experiments/z1.ds.json): gradients reduced once per optimizer step, ranks balanced
#            by their token totals
#   X:NAME   an experiment: S + the --set lines of bench/experiments/NAME.sets
#   PX:NAME  an experiment: P with bench/experiments/NAME.ds.json merged into its DeepSpeed config
#   PS:NAME  an experiment: P with whichever of bench/experiments/NAME.sets (--set lines), NAME.env (harness
#            environment, e.g. BENCH_TOKEN_SYNC=1) and NAME.ds.json exist
#   FX:NAME  the same for fast
#   ITEM#N   (P, Pb, Ppad, Ploop, Pnoskip, Pskip, Psplit, Pcudnn, Pflce, Pslice, PX, PS, fast, fastloop, fastcudnn, fastflash,
#            fastflce, fastslice, FX) the item again, as out_<name>_rN: run-to-run noise in one call
#   chain    `sftjobs submit prod --dry-run-first --executor local` as configs/prod.yaml stands: data -> model ->
#            preflight -> dry run (DRY_SAMPLES samples) -> validate_dry_run, then the full run is cancelled
# Each training item is `torchrun bench/lf_bench.py <the rendered train.yaml>` (= FORCE_TORCHRUN=1
# llamafactory-cli train) with max_steps set; the first WARM steps are warm-up, the rest are measured.
#
# Env: P_ENV / FAST_ENV (extra environment for the P / fast items); PROFILE_ITEM (items' out names, e.g. "P fast_r3":
#      torch.profiler over its step PROFILE_STEP (6) on rank 0: out_NAME/profile_rank0.txt, trace_rank0.json.gz and
#      gaps_rank0.txt, where the GPU waited (bench/trace_gaps.py))
#      SHAPE (qwen2.5-3b) NDATA (2000) BUDGET_S (560) TAG (gpu) DRY_SAMPLES (1000) WARM (3)
#      STEPS_A (9) STEPS_S (16) STEPS_FAST (10) LIMIT_A (170) LIMIT_S (110) LIMIT_FAST (120) LIMIT_CHAIN (330)
set -u
T0=$(date +%s)
ITEMS="${1:-nccl A S fast chain}"
SHAPE=${SHAPE:-qwen2.5-3b}; NDATA=${NDATA:-2000}; BUDGET_S=${BUDGET_S:-560}; TAG=${TAG:-gpu}
DRY_SAMPLES=${DRY_SAMPLES:-1000}; WARM=${WARM:-3}
STEPS_A=${STEPS_A:-9}; STEPS_S=${STEPS_S:-16}; STEPS_FAST=${STEPS_FAST:-10}
LIMIT_A=${LIMIT_A:-170}; LIMIT_S=${LIMIT_S:-110}; LIMIT_FAST=${LIMIT_FAST:-120}; LIMIT_CHAIN=${LIMIT_CHAIN:-330}
OUT=${OUT:-/tmp/out}; W=${BENCH_WORK:-/tmp/bp}; REPO=$PWD
# The proposal's launcher.setup exports this (bench/prod_proposal.sets); harness runs of S, fast and the
# experiments get it as well. A (the plan's config) runs with torch's defaults.
PROPOSAL_ENV=${PROPOSAL_ENV:-TORCH_CUDNN_SDPA_DEPRIORITIZED=1}
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TORCH_NCCL_AVOID_RECORD_STREAMS=1
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
case " $ITEMS " in *" A "*)  # ZeRO-Offload's cpu_adam is JIT-built by DeepSpeed (~40 s): start it now
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
# Which SDPA kernel runs for a causal bf16 GQA call, by default and with the proposal's environment
{ echo "default: $(python3 bench/probe_gpu.py --sdpa-op 2>/dev/null | tail -1)"
  echo "with $PROPOSAL_ENV: $(env $PROPOSAL_ENV python3 bench/probe_gpu.py --sdpa-op 2>/dev/null | tail -1)"; } | tee "$W/sdpa_backend.txt"
if tail -1 "$W/sdpa_backend.txt" | grep -q cudnn; then  # the knob is not honoured by this torch: switch in-process
  el "TORCH_CUDNN_SDPA_DEPRIORITIZED not honoured here; harness runs use torch.backends.cuda.enable_cudnn_sdp(False)"
  PROPOSAL_ENV="$PROPOSAL_ENV BENCH_NO_CUDNN_SDPA=1"
fi
el "setup done"

COMMON=(--set model.source=path --set "model.path=$W/model" --set data.source=path --set "data.path=$W/data/sft.jsonl"
        --set "data.dir=$W/data_h" --set "resources.gpus_per_node=$NG" --set train.logging_steps=1
        --set train.include_num_input_tokens_seen=non_padding --set train.save_steps=100000 --set train.plot_loss=false)
# sets_arr FILE ARRAY: the file's KEY=VALUE lines (no comments, no blanks) as --set arguments, spaces kept
sets_arr() { local -n _arr=$2; _arr=(); [ -f "$1" ] || return 0
  while IFS= read -r line; do [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue; _arr+=(--set "$line"); done < "$1"; }
sets_arr bench/prod_proposal.sets PROP
sets_arr bench/plan_config.sets PLAN

PORT=29611

# lfrun NAME PROFILE LIMIT STEPS TOKDIR ENV [--set k=v ...]
lfrun() {
  local name=$1 profile=$2 limit=$3 steps=$4 tok=$5 envs=$6; shift 6
  local need=$(( limit < 60 ? limit : 60 ))
  if [ "$(left)" -lt "$need" ]; then el "skip $name: $(left)s left"; echo "$name skipped (time)" >> "$W/skipped.txt"; return; fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  local od="$W/out_$name" rd="$W/render_$name"; rm -rf "$od" "$rd"; mkdir -p "$od"
  case " ${PROFILE_ITEM:-} " in *" $name "*) envs="$envs BENCH_PROFILE_STEP=${PROFILE_STEP:-6}" ;; esac  # torch.profiler, rank 0
  python3 -m sftjobs render "$profile" --out "$rd" "${COMMON[@]}" --set "output_dir=$od/ckpt" \
    --set "train.max_steps=$steps" --set "train.tokenized_path=$W/$tok" "$@" > "$od/render.log" 2>&1 \
    || { el "$name: render FAILED"; cat "$od/render.log"; return; }
  if [ -n "${DSPATCH:-}" ] && [ -f "$DSPATCH" ] && [ -f "$rd/deepspeed.json" ]; then  # experiment: DeepSpeed settings
    python3 -c "
import json, sys
def merge(a, b):
    for k, v in b.items():
        a[k] = merge(a.get(k, {}), v) if isinstance(v, dict) else v
    return a
d = json.load(open(sys.argv[1])); merge(d, json.load(open(sys.argv[2]))); json.dump(d, open(sys.argv[1], 'w'), indent=1)
" "$rd/deepspeed.json" "$DSPATCH"
  fi
  cp "$rd/llamafactory/train.yaml" "$od/train.yaml"; [ -f "$rd/deepspeed.json" ] && cp "$rd/deepspeed.json" "$od/"
  el "run $name ($profile) on $NG GPU(s), $steps steps, limit ${limit}s"
  nvidia-smi --query-gpu=timestamp,index,memory.used,utilization.gpu,power.draw --format=csv,noheader -l 2 > "$od/smi.csv" 2>/dev/null &
  local smi=$!
  env $envs BENCH_OUT="$od" setsid torchrun --nproc_per_node "$NG" --master_port $PORT bench/lf_bench.py "$od/train.yaml" \
    > "$od/train.log" 2>&1 &
  local tr=$!
  ( sleep "$limit"; kill -TERM -$tr 2>/dev/null; sleep 10; kill -KILL -$tr 2>/dev/null ) &
  local wd=$!
  wait $tr; local rc=$?
  kill $wd 2>/dev/null; wait $wd 2>/dev/null; kill -KILL -$tr 2>/dev/null; kill $smi 2>/dev/null; wait $smi 2>/dev/null
  PORT=$((PORT + 1))
  el "$name rc=$rc"; echo "$rc" > "$od/rc"
  [ -f "$od/trace_rank0.json.gz" ] && python3 bench/trace_gaps.py "$od/trace_rank0.json.gz" "$od/gaps_rank0.txt" | head -45
  grep -E "\[bench\]|Error|error:|Traceback|OutOfMemory|out of memory|Killed|[Ll]iger|neat|FlashAttention|checkpointing" "$od/train.log" \
    | grep -v "^\s*$" | tail -25
  sleep 2
}

chain() {
  if [ "$(left)" -lt 150 ]; then el "skip chain: $(left)s left"; echo "chain skipped (time)" >> "$W/skipped.txt"; return; fi
  local limit=$LIMIT_CHAIN; [ "$limit" -gt "$(( $(left) - 15 ))" ] && limit=$(( $(left) - 15 ))
  local ck=$W/ckpt; local shm_free=$(df -BG --output=avail /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)
  [ "${shm_free:-0}" -gt 120 ] && ck=/dev/shm/bench_ckpt   # a 3B checkpoint with optimizer state is ~45 GB
  export SFTJOBS_JOBS_DIR=$W/jobs; rm -rf "$SFTJOBS_JOBS_DIR" "$ck" "$W/data_chain"
  el "chain: sftjobs submit prod --dry-run-first (dry run $DRY_SAMPLES samples), limit ${limit}s, checkpoints in $ck"
  python3 -m sftjobs submit prod --dry-run-first --executor local \
    --set model.source=synthetic --set "model.synthetic_shape=$SHAPE" --set "model.local_dir=$W/model" \
    --set data.source=path --set "data.path=$W/data/sft.jsonl" --set "data.dir=$W/data_chain" \
    --set "output_dir=$ck/prod" --set "resources.gpus_per_node=$NG" --set "dry_run.max_samples=$DRY_SAMPLES" \
    --set "resources.gpu_memory_gib=$GPU_GIB" --set train.include_num_input_tokens_seen=non_padding ${CHAIN_EXTRA:-} \
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

for item in $ITEMS; do
  rep=""; case $item in *"#"*) rep="_r${item##*#}"; item=${item%#*} ;; esac  # ITEM#N: a repeat, out_<name>_rN
  case $item in
    nccl) [ "$NG" -gt 1 ] && timeout 90 torchrun --nproc_per_node "$NG" --master_port 29599 bench/nccl_bw.py "$W/nccl.json" 2>&1 | tail -2 ;;
    attn) timeout 120 python3 bench/probe_gpu.py --attn "$W/attn.json" 2>&1 | grep -v Warn | tail -8 ;;
    gputest) timeout 180 python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_per_sample_attention_gpu.py \
               tests/test_split_attention.py 2>&1 \
               | tail -15 | tee "$W/gputest.txt" ;;
    probe) [ "$(left)" -gt 100 ] && timeout $(( $(left) < 150 ? $(left) - 10 : 150 )) python3 bench/probe_gpu.py "${PROBE_MODEL:-qwen2.5-3b}" "$W/probe.json" 2>&1 | grep -v Warn | tail -30 ;;
    A) for i in $(seq 60); do grep -q "cpu_adam built\|Error" "$W/cpu_adam_build.log" 2>/dev/null && break; sleep 2; done
       lfrun A prod "$LIMIT_A" "$STEPS_A" tok_nopack "" "${PLAN[@]}" ;;
    S) lfrun S prod "$LIMIT_S" "$STEPS_S" tok_nopack "$PROPOSAL_ENV ${S_ENV:-}" "${PROP[@]}"
       ;;
    fast|fastloop|fastcudnn|fastflash|fastflce|fastslice|FX:*) name=$item$rep; patch=; mode=BENCH_CUDNN_ATTN=${CUDNN_BUCKET:-256}
          case $item in fastloop) mode=BENCH_ATTN_LOOP=1 ;;
                        fastflash) mode= ;;
                        fastflce) mode="$mode BENCH_LIGER_KEEP=fused_linear_cross_entropy" ;;
                        fastslice) mode="$mode BENCH_SLICE_BACKWARD=1" ;;
                        FX:*) name=fast_${item#FX:}$rep; patch=bench/experiments/${item#FX:}.ds.json ;; esac
          DSPATCH=$patch lfrun "$name" fast "$LIMIT_FAST" "$STEPS_FAST" tok_neat "$PROPOSAL_ENV BENCH_SEGMENT_ATTN=1 $mode ${FAST_ENV:-}" \
            --set "resources.gpu_memory_gib=$GPU_GIB"
          grep -h "memory plan" "$W/out_$name/render.log" ;;
    fastmask) lfrun fastmask fast "$LIMIT_FAST" "$STEPS_FAST" tok_neat "$PROPOSAL_ENV" --set deepspeed=z2 \
                --set train.disable_gradient_checkpointing=false ;;
    P|Pb|Ppad|Ploop|Pskip|Psplit|Pnoskip|Pcudnn|Pflce|Pslice|PX:*|PS:*) name=$item$rep; patch=; XS=()
       prod="BENCH_PACK=1 BENCH_UNPAD=1 BENCH_SKIP_IDLE=1 BENCH_SPLIT=1"  # P's harness switches: what configs/prod.yaml's speed section turns on
       case $item in P|Psplit) mode=$prod ;;
                     Pcudnn) mode="$prod BENCH_CUDNN_ATTN=${CUDNN_BUCKET:-256}" ;;
                     Pflce) mode="$prod BENCH_LIGER_KEEP=fused_linear_cross_entropy" ;;
                     Pslice) mode="$prod BENCH_SLICE_BACKWARD=1" ;;
                     Pb) mode="BENCH_BALANCE=1 BENCH_UNPAD=1" ;;
                     Ploop) mode="$prod BENCH_ATTN_LOOP=1" ;;
                     Pskip) mode="BENCH_PACK=1 BENCH_UNPAD=1 BENCH_SKIP_IDLE=1" ;;
                     Pnoskip) mode="BENCH_PACK=1 BENCH_UNPAD=1" ;;
                     Ppad) mode="BENCH_BALANCE=1" ;;
                     PX:*) mode=$prod; name=P_${item#PX:}$rep
                           patch=bench/experiments/${item#PX:}.ds.json ;;
                     PS:*) n=${item#PS:}; name=P_$n$rep; sets_arr "bench/experiments/$n.sets" XS
                           mode="$prod $(cat "bench/experiments/$n.env" 2>/dev/null)"
                           patch=bench/experiments/$n.ds.json ;; esac
       DSPATCH=$patch lfrun "$name" prod "$LIMIT_S" "$STEPS_S" tok_nopack "$PROPOSAL_ENV $mode ${P_ENV:-}" \
         --set "batch.global_size=$((2 * NG))" --set "resources.gpu_memory_gib=$GPU_GIB" "${XS[@]}"
       grep -h "memory plan" "$W/out_$name/render.log" ;;
    SB) lfrun SB prod "$LIMIT_S" "$STEPS_S" tok_nopack "$PROPOSAL_ENV BENCH_BALANCE=1 ${S_ENV:-}" "${PROP[@]}" ;;
    S1B) DSPATCH=bench/experiments/z1.ds.json lfrun S1B prod "$LIMIT_S" "$STEPS_S" tok_nopack \
           "$PROPOSAL_ENV BENCH_BALANCE=1 ${S_ENV:-}" "${PROP[@]}" ;;
    fastseg) lfrun fastseg fast "$LIMIT_FAST" "$STEPS_FAST" tok_neat "$PROPOSAL_ENV BENCH_SEGMENT_ATTN=1" \
               --set deepspeed=z2 --set train.disable_gradient_checkpointing=false ;;
    fastnr) lfrun fastnr fast "$LIMIT_FAST" "$STEPS_FAST" tok_neat "$PROPOSAL_ENV BENCH_SEGMENT_ATTN=1" \
              --set deepspeed=z2 --set train.disable_gradient_checkpointing=true ;;
    X:*) n=${item#X:}; sets_arr "bench/experiments/$n.sets" XS
       DSPATCH=bench/experiments/$n.ds.json lfrun "S_$n" prod "$LIMIT_S" "$STEPS_S" tok_nopack "$PROPOSAL_ENV" "${PROP[@]}" "${XS[@]}" ;;
    chain) chain ;;
    *) el "unknown item $item" ;;
  esac
done

el "summarize"
python3 bench/summarize_prod.py "$W" "$OUT/prod_$TAG.json" "$OUT/summary_$TAG.md" "$WARM" 2>&1 | tail -60
cd "$W" && tar czf "$OUT/bench_$TAG.tgz" --exclude='*.safetensors' gpus.csv topo.txt peak.json nccl.json probe.json attn.json gputest.txt skipped.txt \
  cpu_adam_build.log sdpa_backend.txt data/sft.jsonl.stats.json out_*/timing_rank*.json out_*/smi.csv out_*/train.log out_*/train.yaml \
  out_*/deepspeed.json out_*/rc out_*/profile_rank0.txt out_*/gaps_rank0.txt out_*/trace_rank0.json.gz chain_* jobs/*/plan.json jobs/*/logs jobs/*/reports jobs/*/monitor \
  jobs/*/llamafactory jobs/*/deepspeed.json jobs/*/handoff.json 2>/dev/null
ls -la "$OUT"
el "all done"
