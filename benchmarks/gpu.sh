#!/usr/bin/env bash
# The GPU benchmarks in one command (one CUDA GPU; ~8 minutes on an H100/H200):
#   bash benchmarks/gpu.sh [LOG_DIR]
# 1. the ViT-B/16 training step in bf16 at batch 128, eager and torch.compile: s/step, images/s, counted FLOPs, MFU
# 2. tokenizer encode/decode against the SD-VAE architecture, bf16
# 3. generator XL against DiT-XL/2 (32x32x4 latent), bf16
# 4. a 30-step bf16 + torch.compile run of `stellar_tok.train` on the tiny config (the trainer on a GPU, end to end)
# Tables go to docs/BENCHMARKS.md (sections marked GPU); logs to LOG_DIR (default runs/gpu_bench).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-runs/gpu_bench}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$LOG/gpu.csv" 2>&1
python3 -m benchmarks.train_speed configs=vit_b16 device=cuda precision=bf16 batch.vit_b16=128 warmup.vit_b16=5 \
    steps.vit_b16=10 rounds=1 timeout=150 2>&1 | tee "$LOG/train_speed.log"
timeout 75 python3 -m benchmarks.tokenizer_speed batches=1,16,64 rounds=10 device=cuda precision=bf16 2>&1 | tee "$LOG/tokenizer_speed.log"
timeout 75 python3 -m benchmarks.generator_cost config=xl batch=32 rounds=10 device=cuda precision=bf16 2>&1 | tee "$LOG/generator_cost.log"
timeout 120 python3 -m stellar_tok.train config=configs/tokenizer/tiny.yaml recon.lpips_random_backbone=true train.steps=30 data.train_size=2048 \
    train.mixed_precision=bf16 train.compile=true train.log_every=10 train.progress=false train.output_dir="$LOG/tiny_bf16" \
    2>&1 | tail -n 25 | tee "$LOG/train_tiny.log"
