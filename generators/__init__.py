"""A class-conditional diffusion transformer over the STELLAR sparse latent (tokens + localization matrix).

    generators.dit        LatentDiT: adaLN-Zero DiT over r token positions + the patchified localization map
    generators.flow       rectified-flow loss and the guided ODE sampler (diffusers flow-matching schedulers)
    generators.pipeline   StellarDiTPipeline: a diffusers DiffusionPipeline (tokenizer + generator + scheduler)
    generators.train      accelerate launch -m generators.train config=configs/generator/tiny.yaml data.latents=DIR
    generators.trainer    the generator's step and run: the model for a latent set, the EMA, sample grids, the exports
    generators.sampling   seeded, streamed class-conditional sampling to samples.npz (the sample command's work)
    generators.sample     python -m generators.sample generator=DIR tokenizer=DIR classes=0,1 n=8 cfg=4 out=DIR
    generators.judge      the class-accuracy judge: a small CNN trained on real images
    generators.scoring    gFID, KID, IS and class accuracy of a sample set (python -m generators.evaluate)
    generators.sample_files  a samples.npz or a folder of images, read batch by batch
"""
from .dit import LatentDiT
from .pipeline import StellarDiTPipeline

__all__ = ["LatentDiT", "StellarDiTPipeline"]
