"""Measurements of stellar-tok, each run from the checkout's root as `python -m benchmarks.X key=value ...` (`--help`
lists every key; an unknown key or a wrong type stops with one line, exit status 2). Tables go to docs/BENCHMARKS.md
(the ablations also to docs/RESULTS.md).

    tokenize_speed    the tokenize job against the tokenizer's own encode loop
    tokenizer_speed   the ViT-B/16 tokenizer against the SD-VAE architecture at 256 px (CPU or GPU, eager or compiled)
    generator_cost    the latent DiT against DiT on a 32x32x4 SD-VAE latent: FLOPs, s per guided step, images/s
    scaling           the ViT-B/16 tokenizer's cost by resolution and by r
    train_speed       the training step: throughput and memory (CPU), MFU (GPU), eager and torch.compile
    view_memory       activation memory of the training step by number of views
    fid_memory        peak memory of generators.evaluate by number of samples
    ablation          STELLAR against three ablations at an equal CPU budget (32 px)
    real_images       STELLAR against reconstruction only on the emoji set at 10x compression
    imagenet_like     the stages of imagenet_rehearsal.sh (data, ViT-MAE and Inception stand-ins, measured runs, report)

Helpers: common (arguments, timing, FLOPs, logged child processes, doc sections), imagenet_data (the rendered
ImageNet-like images), imagenet_report (the rehearsal's summary). Shell scripts: gpu.sh (the GPU benchmarks in one
command) and imagenet_rehearsal.sh (the ImageNet path on one GPU, or shrunk on a CPU).
"""
