#!/usr/bin/env bash
# Every GPU measurement of the project in one command, about 8 minutes on one H200 (wheel install included):
#   SCALE=gpu bash benchmarks/gpu_check.sh          (SCALE=cpu: the same stages shrunk to a minute on a CPU; the suite runs it)
#
# On the lent GPU machine (no registry) the packages missing there travel as wheels (.whl/, the list at the top of
# benchmarks/imagenet_rehearsal.sh) and the device tool's `run` calls, with carry=[".whl"] and timeout_s=560:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site || exit; SCALE=gpu bash benchmarks/gpu_check.sh
#
# Stages, most important first; each runs under `timeout` within the budget GLOBAL_S (default 470 s on gpu) and is
# skipped, with a line saying so, when less time is left than it needs. After every stage $OUT is rewritten
# (`python -m benchmarks.gpu_check`): gpu_check.md (the tables), gpu_check.json, logs.tar.gz, and the chain's
# samples_grid.png and b16_reconstruction.png: at most 8 files, so a run cut short still returns what it finished.
#  1. b16    configs/tokenizer/vit_b16.yaml at batch 128 (8 + 8 views, bf16) in one process, one row per setting
#            (benchmarks/train_step.py): the config as it is (6 of 12 encoder blocks checkpointed); no, 4 and all 12
#            blocks checkpointed (peak memory: what fits an 80-GB GPU); fused AdamW; channels-last LPIPS; compiled
#            blocks. s/step, images/s, counted TFLOP/step (the model's), MFU, peak GPU memory.
#  2. chain  the generation chain on the GPU: benchmarks/imagenet_rehearsal.sh with SKIP_H14=1 and small sizes (ImageNet-
#            format shards of rendered JPEGs -> a quick B/16 run and export -> tokenize -> generators.train ->
#            generators.sample -> fid_stats + generators.evaluate with a random-weights Inception: plumbing only).
#  3. h14    configs/tokenizer/vit_h14.yaml in one process without FSDP: batch 8 without checkpointing (what the FSDP2
#            rehearsal ran at 3.66 s/step), the config as it is (batch 32, every encoder block checkpointed), batch 64.
# Environment: WORK (scratch; default /tmp/gpu_check on gpu, runs/gpu_check_cpu on cpu), OUT (default $WORK/out),
# GLOBAL_S, PY.
set -uo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-gpu}
case "$SCALE" in gpu|cpu) ;; *) echo "SCALE must be gpu or cpu (got $SCALE)" >&2; exit 2;; esac
if [ -x .venv/bin/python ]; then PY=${PY:-$PWD/.venv/bin/python}; else PY=${PY:-python3}; fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false

if [ "$SCALE" = gpu ]; then
  W=${WORK:-/tmp/gpu_check}
  GLOBAL_S=${GLOBAL_S:-470}
  DEV=(device=cuda precision=bf16 threads=8)
  B16=(configs=vit_b16 batch.vit_b16=128 warmup.vit_b16=2 steps.vit_b16=4)
  B16_ROWS="base;ckpt=0;ckpt=4;ckpt=-1;fused;channels_last;compile"
  H14=(configs=vit_h14 batch.vit_h14=32 warmup.vit_h14=1 steps.vit_h14=2)
  H14_ROWS="batch=8+ckpt=0;base;batch=64"
  # measured on an H200: data 57 s, MAE folder 12, B/16 47, tokenize 22, generator 63, sample 31, Inception 15, FID 2 x 17
  CHAIN=(N_TRAIN=320 N_VAL=128 CLASSES=16 SHARD=80 B16_STEPS=20 B16_GAN=10 B16_BATCH=64 B16_MIN=0.4 FID_N=128 GLOBAL_S=290
         REPORT_EACH=0)
  declare -A NEED=([b16]=60 [chain]=200 [h14]=40) LIMIT=([b16]=150 [chain]=300 [h14]=100)
else
  W=${WORK:-runs/gpu_check_cpu}
  GLOBAL_S=${GLOBAL_S:-900}
  DEV=(device=cpu precision=fp32 threads=2)
  # the tiny config stands in for both ImageNet configs; no compile row (a cold CPU compile alone takes ~40 s)
  B16=(configs=tiny batch.tiny=4 warmup.tiny=1 steps.tiny=1)
  B16_ROWS="base;ckpt=0;ckpt=2;ckpt=-1;fused;channels_last"
  H14=(configs=tiny batch.tiny=3 warmup.tiny=1 steps.tiny=1)
  H14_ROWS="batch=2+ckpt=0;base;batch=4"
  CHAIN=(GLOBAL_S=600 REPORT_EACH=0)
  declare -A NEED=([b16]=5 [chain]=30 [h14]=5) LIMIT=([b16]=120 [chain]=600 [h14]=120)
fi
R=${OUT:-$W/out}
case "$W" in /|"$PWD"|"$HOME") echo "refusing WORK=$W" >&2; exit 2;; esac
if [ -e "$W" ] && [ ! -e "$W/.gpu_check" ]; then echo "WORK=$W exists and is not a gpu_check folder; choose another WORK" >&2; exit 2; fi
rm -rf "$W"
mkdir -p "$W/logs" "$R"
touch "$W/.gpu_check"
T0=$(date +%s)
FAILED=""
"$PY" -m benchmarks.gpu_check stage=env scale="$SCALE" work="$W" > "$W/logs/env.log" 2>&1 || echo "(env: see $W/logs/env.log)"

report() { "$PY" -m benchmarks.gpu_check stage=report work="$W" out="$R" > "$W/logs/report.log" 2>&1 || echo "(report failed: see $W/logs/report.log)"; }
stage() {  # stage NAME CMD...: CMD under `timeout` within what is left of GLOBAL_S, its output in logs/NAME.log
  local name=$1 lim left rc t0; shift
  left=$(( GLOBAL_S - ($(date +%s) - T0) ))
  lim=${LIMIT[$name]}
  if [ "$left" -lt "${NEED[$name]}" ]; then
    echo "=== [$name] SKIPPED: only ${left}s of GLOBAL_S=${GLOBAL_S} left" | tee "$W/logs/$name.log"
    printf '{"stage": "%s", "rc": "skipped", "wall_s": 0}\n' "$name" >> "$W/stages.jsonl"
    FAILED="$FAILED $name"; report; return 0
  fi
  [ "$lim" -le "$left" ] || lim=$left
  echo "=== [$name] $(date +%T) (limit ${lim}s): $*"
  t0=$(date +%s)
  timeout -s TERM -k 20 "$lim" "$@" > "$W/logs/$name.log" 2>&1
  rc=$?
  printf '{"stage": "%s", "rc": %s, "wall_s": %s}\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$W/stages.jsonl"
  [ "$rc" = 0 ] || { FAILED="$FAILED $name"; echo "FAILED (rc $rc; 124: time limit)"; tail -n 15 "$W/logs/$name.log"; }
  echo "    -> rc $rc, $(( $(date +%s) - t0 ))s"
  report
}
# the rows of one config in one process (benchmarks/train_step.py), one JSON line each in the stage's log
stage b16 "$PY" -m benchmarks.train_speed worker=true rows="$B16_ROWS" "${DEV[@]}" "${B16[@]}"
stage chain env "${CHAIN[@]}" SKIP_H14=1 WORK="$W/chain" OUT="$W/chain/out" PY="$PY" bash benchmarks/imagenet_rehearsal.sh "$SCALE"
stage h14 "$PY" -m benchmarks.train_speed worker=true rows="$H14_ROWS" "${DEV[@]}" "${H14[@]}"

report
cat "$R/gpu_check.md"
echo "total $(( $(date +%s) - T0 ))s; results in $R"
if [ -n "$FAILED" ]; then echo "FAILED or skipped stages:$FAILED" >&2; exit 1; fi
