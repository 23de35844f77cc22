"""What a launch is: the line every trainer prints first (processes, distribution and backend, device, precision)."""
from __future__ import annotations

import torch


def describe_launch(accelerator, precision: str | None = None) -> str:
    """'2 processes (multi_cpu, gloo), device cpu, precision no' for an `accelerate.Accelerator` (or a `PartialState`,
    with `precision` given)."""
    world = accelerator.num_processes
    mode = accelerator.distributed_type.value.lower() if world > 1 or accelerator.distributed_type.value != "NO" else "single"
    backend = f", {torch.distributed.get_backend()}" if torch.distributed.is_initialized() else ""
    return (f"{world} process{'es' if world > 1 else ''} ({mode}{backend}), device {accelerator.device.type}, "
            f"precision {precision or getattr(accelerator, 'mixed_precision', 'no')}")
