"""The training losses, on tensors: self-supervised alignment of the sparse tokens and CLS (`alignment`:
clustering, set matching, KoLeo) and pixel reconstruction (`reconstruction`: L1/L2, LPIPS, PatchGAN)."""
