"""The trainable module: tokenizer + clustering heads (+ optional EMA teacher), one forward per step.

Everything that needs gradients runs inside `forward`, so DistributedDataParallel sees one forward and
one backward per step. The reconstruction losses (LPIPS, GAN) are applied by the trainer to `recon`.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from stellar_tok.losses.alignment import AlignmentLoss
from stellar_tok.model.tokenizer import StellarTokenizer


class TokenizerWithHeads(nn.Module):
    """What a tokenizer run trains: the tokenizer, the clustering heads of `AlignmentLoss` and, with
    `align.teacher_momentum`, their EMA teacher. `forward` returns the tokenizer's outputs for the main view (the
    reconstruction among them) with the summed alignment loss and its parts."""

    def __init__(self, tokenizer: StellarTokenizer, align_cfg):
        super().__init__()
        self.tokenizer = tokenizer
        self.align_cfg = align_cfg
        self.align = AlignmentLoss(tokenizer.config.width, align_cfg) if align_cfg.enabled else None
        self.teacher = None
        if self.align is not None and align_cfg.teacher_momentum > 0:
            self.teacher = nn.ModuleDict({"tokenizer": copy.deepcopy(tokenizer), "align": copy.deepcopy(self.align)})
            self.teacher.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:  # the EMA teacher is never in training mode
            self.teacher.eval()
        return self

    def forward(self, views: dict) -> dict:
        tok = self.tokenizer
        out = tok(views["main"])  # cls, dense, sparse, log_loc, tokens, recon
        out["align_loss"], out["align_logs"] = torch.zeros((), device=views["main"].device), {}
        if self.align is not None:
            teacher = None
            if self.teacher is not None:
                with torch.no_grad():
                    t_cls, _, t_sparse = self.teacher["tokenizer"].encode_features(views["main"])
                    ta = self.teacher["align"]
                    teacher = {"cls": t_cls, "sparse": t_sparse, "token_logits": ta.token_head(t_sparse, float32=True),
                               "cls_logits": ta.cls_head(t_sparse.mean(1) if self.align_cfg.image_feature == "tokens" else t_cls, float32=True)}
            out["align_loss"], out["align_logs"] = self.align(tok.encode_features, out, views, teacher)
        return out

    @torch.no_grad()
    def update_teacher(self) -> None:
        if self.teacher is None:
            return
        m = self.align_cfg.teacher_momentum
        for t, s in ((self.teacher["tokenizer"], self.tokenizer), (self.teacher["align"], self.align)):
            for pt, ps in zip(t.parameters(), s.parameters()):
                pt.lerp_(ps.detach(), 1 - m)
