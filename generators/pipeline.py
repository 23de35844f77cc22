"""`diffusers` pipeline: class labels -> images, through the latent DiT and the STELLAR decoder.

    from generators import StellarDiTPipeline
    pipe = StellarDiTPipeline.from_pretrained("runs/gen/pipeline")
    images = pipe(class_labels=[0, 3, 5], guidance_scale=4.0, num_inference_steps=50,
                  generator=torch.Generator().manual_seed(0)).images          # PIL images
    from generators.flow import make_scheduler
    pipe.scheduler = make_scheduler("heun", shift=3.0)   # euler | heun, timestep shift (t = 1: noise)

On a GPU the call runs under bf16 autocast by default (`mixed_precision="auto"`; fp32 on the CPU).
"""
from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, ImagePipelineOutput

from stellar_tok.files import safetensors_only_kwargs
from stellar_tok.model.latent import Latent

from .flow import autocast_dtype, sample_latents


class StellarDiTPipeline(DiffusionPipeline):
    """Holds `tokenizer` (StellarTokenizer), `transformer` (LatentDiT) and `scheduler` (a flow-matching
    scheduler: Euler or Heun, with its `shift`; `generators.flow.make_scheduler`); `save_pretrained` /
    `from_pretrained` keep all three (safetensors + JSON)."""

    model_cpu_offload_seq = "transformer->tokenizer"

    def __init__(self, tokenizer, transformer, scheduler: FlowMatchEulerDiscreteScheduler | FlowMatchHeunDiscreteScheduler):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, transformer=transformer, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """DiffusionPipeline.from_pretrained with safetensors only: pickled weight files are never opened."""
        return super().from_pretrained(pretrained_model_name_or_path, **safetensors_only_kwargs(cls.__name__, kwargs))

    @property
    def labels(self) -> list[str]:
        return list(self.transformer.config.class_names or [])

    def get_label_ids(self, label: int | str | Sequence[int | str]) -> list[int]:
        """Class names (as in the generator's `class_names`) or ids -> ids."""
        items = [label] if isinstance(label, (int, str)) else list(label)
        names = self.labels
        out = []
        for item in items:
            if isinstance(item, str):
                if item not in names:
                    raise ValueError(f"unknown class {item!r}; this generator knows {names}")
                item = names.index(item)
            if not 0 <= int(item) < self.transformer.config.num_classes:
                raise ValueError(f"class id {item} out of range 0..{self.transformer.config.num_classes - 1}")
            out.append(int(item))
        return out

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale: float = 4.0, num_inference_steps: int = 50,
                 guidance_interval: tuple[float, float] = (0.0, 1.0), generator: torch.Generator | None = None,
                 output_type: str = "pil", return_dict: bool = True, mixed_precision: str = "auto"):
        """class_labels: ids or names. output_type: "pil", "np" (float NHWC in [0,1]) or "pt" (NCHW in [0,1]).
        mixed_precision: auto (bf16 autocast on a GPU, fp32 on the CPU) | no | bf16 | fp16."""
        device = self._execution_device
        amp = autocast_dtype(mixed_precision, device)
        labels = torch.tensor(self.get_label_ids(class_labels), device=device)
        noise = None
        if generator is not None and generator.device.type != device.type:  # draw on the generator's device
            cfg = self.transformer.config
            noise = torch.randn(len(labels), cfg.num_tokens * cfg.token_channels + cfg.grid**2 * cfg.num_tokens, generator=generator).to(device)
        with torch.autocast(torch.device(device).type, dtype=amp, enabled=amp is not None):
            z, log_loc = sample_latents(self.transformer, labels, num_inference_steps, guidance_scale, tuple(guidance_interval),
                                         generator=generator, scheduler=self.scheduler, noise=noise)
            latent = Latent(z, log_loc, normalized=True, stats=self.transformer.latent_stats)
            images = (self.tokenizer.decode(latent).float() / 2 + 0.5).clamp(0, 1)  # (B,3,H,W)
        if output_type == "pt":
            out = images
        else:
            out = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(out)
            elif output_type != "np":
                raise ValueError(f"output_type must be pil, np or pt (got {output_type!r})")
        return ImagePipelineOutput(images=out) if return_dict else (out,)
