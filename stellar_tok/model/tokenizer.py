"""STELLAR sparse tokenizer: F = L·S.

An image becomes r sparse semantic tokens S (what) and a localization matrix L (where); the dense
feature map is their low-rank product F = L·S, from which a ViT decoder paints the pixels.

    images (B,3,H,W) in [-1,1]
      -> ViT encoder over [CLS] + N patches + r learned sparse queries
      -> cls (B,d), dense (B,N,d), S (B,r,d)
      -> L = softmax_r( cos(W_d dense, W_s S) / tau )      (B,N,r), rows sum to 1
      -> z = to_latent(S)                                   (B,r,c)   the generative latent, with log L
      -> F = L · from_latent(z)                             (B,N,e)
      -> ViT decoder + Fourier positions -> pixels          (B,3,H,W)

`decoder_input="dense"` is the ablation without the factorisation: the decoder reads every patch feature
through the same bottleneck, z = to_latent(dense) (B,N,c) with L = identity (B,N,N): the degenerate case
r = N of F = L·S. The r sparse tokens S are still computed (the alignment losses use them) but the decoder
never sees them.

Shapes in comments use B batch, N patches (grid*grid), r sparse tokens, d encoder width,
c latent channels, e decoder width, K kept patches of a masked view. One name per quantity, in code, dict keys
and docs: S = ``sparse``, z = ``z``, L = ``loc``, log L = ``log_loc``, F = ``lowrank`` (`stellar_tok.model.latent`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange

from stellar_tok.files import SafetensorsOnly

from .latent import Latent, LatentStatsBuffers
from .vit import Block, FourierPositionEncoding, interpolate_pos_embed, sincos_pos_embed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def conv_stem(width: int, patch_size: int) -> nn.Sequential:
    """log2(p) stride-2 3x3 convolutions (GroupNorm, GELU), channels growing to width/2, then a 1x1 to width.

    Its receptive field reaches a few pixels into neighbouring patches, so a masked view's kept patches
    see the border pixels of dropped ones (the plain patch stem sees nothing of them)."""
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise ValueError(f"the conv stem needs a power-of-two patch size >= 2 (got {patch_size})")
    n = patch_size.bit_length() - 1
    chans = [3] + [max(16, width // 2 ** (n - i)) for i in range(n)]
    layers: list[nn.Module] = []
    for cin, cout in zip(chans[:-1], chans[1:]):
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.GroupNorm(1, cout), nn.GELU()]
    layers.append(nn.Conv2d(chans[-1], width, 1))
    return nn.Sequential(*layers)


class StellarTokenizer(SafetensorsOnly, ModelMixin, ConfigMixin, LatentStatsBuffers):
    """The STELLAR tokenizer. Saves/loads like a `diffusers` model: safetensors weights + config.json."""

    config_name = "config.json"
    _supports_gradient_checkpointing = True  # diffusers' enable_gradient_checkpointing(): every encoder block

    @register_to_config
    def __init__(
        self,
        image_size: int = 256,
        patch_size: int = 16,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        num_tokens: int = 16,
        latent_channels: int = 32,
        tau: float = 0.06,
        decoder_width: int = 512,
        decoder_depth: int = 6,
        decoder_heads: int = 8,
        decoder_mlp_ratio: float = 4.0,
        loc_floor: float = 1e-4,
        imagenet_norm: bool = True,
        stem: str = "patch",
        decoder_input: str = "lowrank",
        norm_eps: float = 1e-6,  # the encoder's LayerNorm eps (1e-12 to match a Hugging Face ViT-MAE start, model.init_from)
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if decoder_input not in ("lowrank", "dense"):
            raise ValueError(f"decoder_input must be 'lowrank' or 'dense' (got {decoder_input!r})")
        self.grid = image_size // patch_size
        d, e = width, decoder_width

        # --- encoder ---------------------------------------------------------------------------
        if stem == "patch":  # one linear map per patch (ViT)
            self.patch_embed = nn.Conv2d(3, d, kernel_size=patch_size, stride=patch_size)
        elif stem == "conv":  # stride-2 3x3 convolutions down to the patch grid, then 1x1 (Xiao et al. 2021)
            self.patch_embed = conv_stem(d, patch_size)
        else:
            raise ValueError(f"stem must be 'patch' or 'conv' (got {stem!r})")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(sincos_pos_embed(d, self.grid)[None])  # (1, N, d), learned
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, d))
        self.sparse_tokens = nn.Parameter(torch.randn(1, num_tokens, d) * d**-0.5)  # r learned queries
        self.blocks = nn.ModuleList([Block(d, heads, mlp_ratio, norm_eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(d, eps=norm_eps)

        # --- localization: L = softmax(cos(W_d dense, W_s S) / tau) ----------------------------
        # (the dense decoder has no L to learn: W_d, W_s would get no gradient, so they do not exist)
        if decoder_input == "lowrank":
            self.loc_dense = nn.Linear(d, d)
            self.loc_sparse = nn.Linear(d, d)

        # --- the bottleneck S -> z (dense decoder: every patch feature -> z) ---------------------
        self.to_latent = nn.Linear(d, latent_channels)
        self.from_latent = nn.Linear(latent_channels, e)

        # --- pixel decoder ----------------------------------------------------------------------
        self.decoder_pos = FourierPositionEncoding(e, self.grid)
        self.decoder_blocks = nn.ModuleList([Block(e, decoder_heads, decoder_mlp_ratio) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(e, eps=1e-6)
        self.to_pixels = nn.Linear(e, patch_size * patch_size * 3)

        # latent normalisation statistics (filled by `set_latent_stats`, shipped with the weights)
        self.register_latent_stats(latent_channels)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN if imagenet_norm else (0.5,) * 3).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD if imagenet_norm else (0.5,) * 3).view(1, 3, 1, 1))
        self._init_weights()
        # activation checkpointing (a training option, not saved): the first `checkpoint_blocks` encoder blocks keep
        # only their input for the backward and recompute the rest there (`set_activation_checkpointing`)
        self.checkpoint_blocks = 0

    @staticmethod
    def _init_linear_and_norm(modules) -> None:
        for m in modules:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _init_weights(self):
        self._init_linear_and_norm(self.modules())
        if isinstance(self.patch_embed, nn.Conv2d):
            w = self.patch_embed.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    DECODER_MODULES = ("from_latent", "decoder_pos", "decoder_blocks", "decoder_norm", "to_pixels")
    DECODER_PREFIXES = tuple(name + "." for name in DECODER_MODULES)  # their state-dict keys

    def fresh_decoder_on_frozen_encoder(self) -> "StellarTokenizer":
        """The paper's reconstruction protocol: re-initialise the pixel decoder (from_latent, blocks, norm, pixel head)
        and freeze everything else, so training changes the decoder only and the latent stays what it was."""
        self.requires_grad_(False)
        for name in self.DECODER_MODULES:
            m = getattr(self, name)
            m.requires_grad_(True)
            self._init_linear_and_norm(m.modules())
        return self

    # ------------------------------------------------------------------------------------------
    # encoder
    # ------------------------------------------------------------------------------------------
    def compile_blocks(self, **kwargs) -> "StellarTokenizer":
        """torch.compile every encoder and decoder block in place (regional compilation: nearly all the
        FLOPs, one small graph per block shape, weights and state-dict keys unchanged)."""
        for blk in [*self.blocks, *self.decoder_blocks]:
            blk.compile(**kwargs)
        return self

    def set_activation_checkpointing(self, blocks: int) -> "StellarTokenizer":
        """Recompute the activations of the first `blocks` encoder blocks in the backward instead of keeping them
        (-1 or the depth: all; 0: none). Exact: the same numbers, less memory, about one more forward of those
        blocks per step. Only where autograd records (training); `encode`, `features` and a teacher are unaffected."""
        depth = len(self.blocks)
        if not -1 <= blocks <= depth:
            raise ValueError(f"activation checkpointing: blocks must be in [-1, {depth}] (got {blocks})")
        self.checkpoint_blocks = depth if blocks == -1 else blocks
        return self

    @property
    def gradient_checkpointing(self) -> bool:  # the diffusers name, read and set by ModelMixin
        return self.checkpoint_blocks > 0

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.checkpoint_blocks = len(self.blocks) if on else 0

    def encode_features(self, images: torch.Tensor, keep: torch.Tensor | None = None):
        """images (B,3,H,W) in [-1,1]; keep (B,K) indices of visible patches for a masked view.

        Returns cls (B,d), dense (B,N or K,d), S (B,r,d)."""
        x = ((images + 1) / 2 - self.pixel_mean) / self.pixel_std  # [-1,1] -> ImageNet-normalised
        x = self.patch_embed(x)  # (B, d, h, w)
        grid = x.shape[-1]
        x = rearrange(x, "b d h w -> b (h w) d") + interpolate_pos_embed(self.pos_embed, grid)  # (B, N, d)
        if keep is not None:  # MAE-style: masked patches are dropped, no mask tokens
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, d)
        b, n = x.shape[:2]
        cls = (self.cls_token + self.cls_pos).expand(b, -1, -1)  # (B, 1, d)
        sparse = self.sparse_tokens.expand(b, -1, -1)  # (B, r, d), no position embedding
        x = torch.cat([cls, x, sparse], dim=1)  # (B, 1 + N + r, d)
        recompute = self.checkpoint_blocks if torch.is_grad_enabled() else 0
        for i, blk in enumerate(self.blocks):  # (B, 1 + N + r, d)
            x = checkpoint(blk, x, use_reentrant=False) if i < recompute else blk(x)
        x = self.norm(x)
        return x[:, 0], x[:, 1 : 1 + n], x[:, 1 + n :]  # cls (B,d), dense (B,N,d), S (B,r,d)

    @property
    def dense_decoder(self) -> bool:
        return self.config.decoder_input == "dense"

    def localize(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """log L (B,N,r): log-softmax over the r tokens of the cosine similarity / tau, in float32 end to end, also
        under bf16 autocast (a cosine of 1/tau = 16.7 times bf16's rounding moves log L by up to 0.15 nats)."""
        with torch.autocast("cuda" if dense.is_cuda else "cpu", enabled=False):  # (also for meta tensors)
            d = F.normalize(F.linear(dense.float(), self.loc_dense.weight.float(), self.loc_dense.bias.float()), dim=-1)  # (B, N, d)
            s = F.normalize(F.linear(sparse.float(), self.loc_sparse.weight.float(), self.loc_sparse.bias.float()), dim=-1)  # (B, r, d)
            logits = torch.einsum("bnd,brd->bnr", d, s) / self.config.tau  # (B, N, r)
            return logits.log_softmax(dim=-1)

    # --- the one place where the dense-decoder ablation differs: what the decoder reads --------
    def factorize(self, dense: torch.Tensor, sparse: torch.Tensor, log_loc: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's source tokens and log L, from which F = L·source; log_loc: localize()'s, if computed.

        lowrank (STELLAR): S (B,r,d) and log L (B,N,r).  dense (ablation): every patch feature (B,N,d) and the log
        of the identity (B,N,N), 0 on the diagonal and -inf elsewhere (clamp_loc puts the floor there): r = N."""
        if self.dense_decoder:
            b, n = dense.shape[:2]
            return dense, torch.eye(n, device=dense.device).expand(b, n, n).log()
        return sparse, self.localize(dense, sparse) if log_loc is None else log_loc

    def latent_tokens(self, n_patches: int) -> int:
        """How many token rows the latent has: r; the dense decoder: one per patch, N."""
        return n_patches if self.dense_decoder else self.config.num_tokens

    def to_decoder_latent(self, dense: torch.Tensor, sparse: torch.Tensor, log_loc: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the decoder reads: z (B,r,c) and log L clamped at the floor (B,N,r); log_loc: localize()'s, if computed.

        lowrank (STELLAR): z = to_latent(S) and log L.  dense: to_latent(dense) (B,N,c) and log I (B,N,N), r = N."""
        source, log_loc = self.factorize(dense, sparse, log_loc)  # (B, r, d) (B, N, r); dense: (B, N, d) (B, N, N)
        return self.to_latent(source), self.clamp_loc(log_loc)  # (B, r, c) (B, N, r)

    def latent_values(self, n_patches: int) -> int:
        """Numbers per image in the latent that depend on the image: r*c + N*r; dense: N*c (L is the fixed identity)."""
        r = self.latent_tokens(n_patches)
        return r * self.config.latent_channels + (0 if self.dense_decoder else n_patches * r)

    # ------------------------------------------------------------------------------------------
    # decoder
    # ------------------------------------------------------------------------------------------
    def decode_pixels(self, z: torch.Tensor, log_loc: torch.Tensor) -> torch.Tensor:
        """z (B,r,c), log_loc (B,N,r) -> images (B,3,H,W), unclamped (training output).

        The dense decoder goes through the same product with r = N: softmax of the clamped log-identity
        keeps 1 / (1 + (N-1)·loc_floor) of each patch's own feature (0.994 at N = 64, floor 1e-4)."""
        L = log_loc.softmax(dim=-1).to(z.dtype)  # (B, N, r), rows sum to 1
        s = self.from_latent(z)  # (B, r, e)
        f = torch.einsum("bnr,bre->bne", L, s)  # F = L·S  (B, N, e)
        grid = int(math.isqrt(f.shape[1]))
        f = f + self.decoder_pos(grid).to(f.dtype)  # (B, N, e)
        for blk in self.decoder_blocks:
            f = blk(f)
        patches = self.to_pixels(self.decoder_norm(f))  # (B, N, p*p*3)
        p = self.config.patch_size
        return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=grid, p=p, q=p, c=3)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the layer that writes pixels (for the GAN's adaptive weight)."""
        return self.to_pixels.weight

    # ------------------------------------------------------------------------------------------
    # training forward: everything the losses need from one clean, unmasked view
    # ------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> dict:
        cls, dense, sparse = self.encode_features(images)  # (B,d) (B,N,d) (B,r,d)
        z, log_loc = self.to_decoder_latent(dense, sparse)  # (B,r,c) (B,N,r); dense decoder: r = N
        recon = self.decode_pixels(z, log_loc)  # (B,3,H,W)
        return {"cls": cls, "dense": dense, "sparse": sparse, "log_loc": log_loc, "z": z, "recon": recon}

    def clamp_loc(self, log_loc: torch.Tensor) -> torch.Tensor:
        return log_loc.clamp(min=math.log(self.config.loc_floor))

    # ------------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, normalize: bool = False) -> Latent:
        """images (B,3,H,W) in [-1,1] -> Latent(z (B,r,c), log_loc = log L (B,N,r)), raw unless normalize.

        Dense decoder: Latent(z (B,N,c), log_loc = log I clamped at the floor (B,N,N))."""
        self._check_images(images)
        _, dense, sparse = self.encode_features(images)
        z, log_loc = self.to_decoder_latent(dense, sparse)
        latent = Latent(z.float(), log_loc.float())
        return latent.normalize(self.latent_stats) if normalize else latent

    @torch.no_grad()
    def decode(self, latent: Latent) -> torch.Tensor:
        """Latent -> images (B,3,H,W) in [-1,1].

        A raw latent is decoded as it is; a normalised one (``latent.normalized``) is first denormalised with
        the statistics it carries (``latent.stats``), or with this tokenizer's when it carries none."""
        if not isinstance(latent, Latent):
            raise TypeError(f"decode expects a stellar_tok.Latent, got {type(latent).__name__}")
        if latent.normalized:
            latent = latent.denormalize(latent.stats if latent.stats is not None else self.latent_stats)
        r = self.latent_tokens(latent.num_patches)
        if latent.num_tokens != r or latent.z.shape[-1] != self.config.latent_channels:
            raise ValueError(f"latent has r={latent.num_tokens}, c={latent.z.shape[-1]}; this tokenizer expects "
                             f"r={r}, c={self.config.latent_channels} ({self.config.decoder_input} decoder)")
        dtype = self.dtype
        return self.decode_pixels(latent.z.to(dtype), latent.log_loc.to(dtype)).clamp(-1, 1)

    @torch.no_grad()
    def features(self, images: torch.Tensor, with_latent: bool = False) -> dict:
        """dict of cls (B,d), sparse = S (B,r,d), dense (B,N,d), loc = L (B,N,r), lowrank = F = L·S (B,N,d).

        Dense decoder: loc = I (B,N,N) and lowrank = dense (what the decoder reads, before the bottleneck).
        with_latent: also "latent", what `encode(images)` returns, from the same encoder pass."""
        self._check_images(images)
        cls, dense, sparse = self.encode_features(images)
        source, log_loc = self.factorize(dense, sparse)  # (B, r, d) (B, N, r)
        L = log_loc.exp()
        lowrank = torch.einsum("bnr,brd->bnd", L.to(source.dtype), source)  # F = L·S; dense: I·dense = dense
        out = {"cls": cls, "sparse": sparse, "dense": dense, "loc": L, "lowrank": lowrank}
        if with_latent:
            z, log_loc = self.to_decoder_latent(dense, sparse, log_loc)
            out["latent"] = Latent(z.float(), log_loc.float())
        return out

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B,3,H,W), got {tuple(images.shape)}")
        p = self.config.patch_size
        if images.shape[-1] % p or images.shape[-2] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by the patch size {p}")
