#!/usr/bin/env bash
# The toy profile's whole chain on one GPU through sftjobs' local executor: data -> model -> preflight -> train
# -> validate, with Qwen2.5-0.5B-shaped random weights (made by the model step) and 500 synthetic ARPO-shaped
# rows of realistic length (bench/make_bench_data.py; toy's cutoff 4096 truncates the long tail), ZeRO-2.
#   bash bench/toy_gpu.sh          (repo root; carry .whl and .benchdata) -> $OUT/toy.tgz, $OUT/toy_summary.json
set -u
T0=$(date +%s); OUT=${OUT:-/tmp/out}; W=${TOY_WORK:-/tmp/toy}; REPO=$PWD
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false DISABLE_VERSION_CHECK=1
el() { echo "[toy t=$(( $(date +%s) - T0 ))s] $*"; }
if [ ! -f /tmp/site/.ok ] && [ -z "${BENCH_SKIP_PIP:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.ok || el "pip install FAILED"
fi
[ -z "${BENCH_SKIP_PIP:-}" ] && export PYTHONPATH=/tmp/site:$REPO PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, deepspeed, llamafactory, submitit; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'llamafactory', llamafactory.__version__)" 2>&1 | tail -1
python3 bench/make_bench_data.py data .benchdata/tokenizer "$W/src/arpo_toy.jsonl" "${TOY_ROWS:-500}" 1 2>&1 | grep -v -i warn
mkdir -p "$W/model" && cp .benchdata/tokenizer/* "$W/model/"   # the model step makes the weights around it
export SFTJOBS_JOBS_DIR=$W/jobs
el "submit toy"
timeout "${TOY_LIMIT_S:-360}" python3 -m sftjobs submit toy --executor local --wait \
  --set model.source=synthetic --set "model.synthetic_shape=${TOY_SHAPE:-qwen2.5-0.5b}" --set "model.local_dir=$W/model" \
  --set data.source=path --set "data.path=$W/src/arpo_toy.jsonl" --set "data.dir=$W/data" \
  --set "output_dir=$W/ckpt" --set train.save_total_limit=2 ${TOY_EXTRA:-} 2>&1 | tee "$W/submit.log"
el "toy chain returned"
RUN=$(awk '/^run /{print $2; exit}' "$W/submit.log")
python3 -m sftjobs cancel "$RUN" > /dev/null 2>&1  # only acts if the time limit above cut the wait short
python3 -m sftjobs status "$RUN" > "$W/status.txt" 2>&1; cat "$W/status.txt"
python3 -m sftjobs status "$RUN" --json > "$W/status.json" 2>&1
python3 - "$W" "$RUN" "$OUT/toy_summary.json" <<'PY'
import glob, json, os, sys
sys.path.insert(0, "bench")
from summarize_prod import monitor_peaks_mib
w, run, out = sys.argv[1:]
rd = os.path.join(w, "jobs", run)
st = json.load(open(os.path.join(w, "status.json")))
res = {"run": run, "steps": {s["step"]: {"state": s["state"], "elapsed": s["elapsed"]} for s in st["steps"]}}
res["peak_gpu_mem_used_MiB_nvidia_smi"] = monitor_peaks_mib(glob.glob(os.path.join(rd, "monitor", "*.jsonl")))
tl = glob.glob(os.path.join(w, "ckpt", "trainer_log.jsonl"))
if tl:
    ents = [json.loads(l) for l in open(tl[0]) if l.strip()]
    losses = [(e["current_steps"], e["loss"]) for e in ents if "loss" in e]
    res["loss_first_last"] = [losses[0], losses[-1]] if losses else None
    res["train_elapsed"] = ents[-1].get("elapsed_time")
res["checkpoints"] = sorted(os.path.basename(p) for p in glob.glob(os.path.join(w, "ckpt", "checkpoint-*")))
json.dump(res, open(out, "w"), indent=1)
print(json.dumps(res, indent=1))
PY
cd "$W" && tar czf "$OUT/toy.tgz" status.txt status.json submit.log src/arpo_toy.jsonl.stats.json ckpt/trainer_log.jsonl \
  jobs/*/reports jobs/*/handoff.json jobs/*/monitor jobs/*/logs jobs/*/llamafactory jobs/*/deepspeed.json jobs/*/plan.json 2>/dev/null
el "toy done"
