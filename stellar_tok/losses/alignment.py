"""Self-supervised alignment of sparse tokens across views (DINO/CAPI-style online clustering).

    ClusteringHead      Linear -> GELU -> Linear -> L2-normalise -> prototypes (bias-free linear, K outputs)
    sinkhorn_knopp      balanced soft cluster assignments over every token of the global batch (fp32,
                        sums all-reduced across processes)
    match_tokens        one-to-one match of a view's r tokens to the main view's r tokens: entropic OT
                        (uniform marginals, unsquared L2 cost, log domain) then Hungarian on the plan
    koleo               Kozachenko-Leonenko entropy regulariser among the r tokens of one image
    AlignmentLoss       puts them together: token/CLS self terms on the main view, matched tokens and CLS of
                        masked views, CLS of local crops, KoLeo on main and masked views
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def _all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


class ClusteringHead(nn.Module):
    """MLP -> L2-normalised embedding -> prototype logits; without prototypes (None) a projection head."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, prototypes: int | None, prototype_std: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Linear(bottleneck, prototypes, bias=False) if prototypes else None
        if self.prototypes is not None:  # std 0: bottleneck^-0.5 (rows of norm ~1); the reference's CAPI heads: 1.0
            nn.init.normal_(self.prototypes.weight, std=prototype_std or bottleneck**-0.5)

    def forward(self, x: torch.Tensor, float32: bool = False) -> torch.Tensor:
        """(..., d) -> logits (..., K), or the embedding (..., bottleneck). float32: the whole head in float32 whatever
        autocast or FSDP's parameter dtype (the logits Sinkhorn turns into targets: under bf16 they move 1.5-2.3% of
        the targets' top prototypes, docs/RECIPE.md "precision")."""
        if not float32:
            z = F.normalize(self.mlp(x), dim=-1)
            return z if self.prototypes is None else self.prototypes(z)
        fc1, fc2 = self.mlp[0], self.mlp[2]
        with torch.autocast("cuda" if x.is_cuda else "cpu", enabled=False):  # (also for meta tensors)
            h = F.gelu(F.linear(x.float(), fc1.weight.float(), fc1.bias.float()))  # (..., hidden)
            z = F.normalize(F.linear(h, fc2.weight.float(), fc2.bias.float()), dim=-1)  # (..., bottleneck)
            return z if self.prototypes is None else F.linear(z, self.prototypes.weight.float())  # (..., K)


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float = 0.06, iterations: int = 3) -> torch.Tensor:
    """logits (..., T, K) -> assignments Q (..., T, K), rows summing to 1, clusters near-equally used over
    the T tokens of the global batch (all processes); leading dims are independent problems. fp32."""
    logits = logits.float() / temperature
    t_local = torch.tensor([logits.shape[-2]], device=logits.device, dtype=torch.float32)
    t_total = _all_reduce(t_local.clone())
    k = logits.shape[-1]
    gmax = _all_reduce(logits.max().clone().view(1), dist.ReduceOp.MAX if dist.is_available() else None)
    q = torch.exp(logits - gmax)  # (..., T, K)
    q /= _all_reduce(q.sum(dim=(-2, -1), keepdim=True))
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=-2, keepdim=True)).clamp_min(1e-30)  # each cluster gets mass 1/K
        q /= k
        q /= q.sum(dim=-1, keepdim=True).clamp_min(1e-30)  # each token gets mass 1/T
        q /= t_total
    return q * t_total


def clustering_loss(pred_logits: torch.Tensor, targets: torch.Tensor, temperature: float = 0.12) -> torch.Tensor:
    """Cross-entropy of softmax(pred / temperature) against targets, summed over K, mean over tokens."""
    logp = F.log_softmax(pred_logits.float() / temperature, dim=-1)
    return -(targets * logp).sum(-1).mean()


@torch.no_grad()
def ot_plan(x: torch.Tensor, y: torch.Tensor, eps: float = 0.1, iterations: int = 5) -> torch.Tensor:
    """Entropic OT plan between two sets per batch item. x (B,r,d), y (B,r,d) -> plan (B,r,r).

    Uniform marginals, unsquared L2 cost between L2-normalised vectors (cost in [0,2]), log-domain."""
    cost = torch.cdist(F.normalize(x.float(), dim=-1), F.normalize(y.float(), dim=-1))  # (B, r, r)
    log_k = -cost / eps
    b, n, m = cost.shape
    log_a = torch.full((b, n), -np.log(n), device=x.device)
    log_b = torch.full((b, m), -np.log(m), device=x.device)
    u = torch.zeros_like(log_a)
    v = torch.zeros_like(log_b)
    for _ in range(iterations):
        u = log_a - torch.logsumexp(log_k + v[:, None, :], dim=2)
        v = log_b - torch.logsumexp(log_k + u[:, :, None], dim=1)
    return torch.exp(u[:, :, None] + log_k + v[:, None, :])


@torch.no_grad()
def match_tokens(view: torch.Tensor, ref: torch.Tensor, eps: float = 0.1, iterations: int = 5, method: str = "hungarian") -> torch.Tensor:
    """For each token j of `view` (B,r,d), the index perm[b,j] of its partner in `ref` (B,r,d).

    method "hungarian": a true permutation (Hungarian on the OT plan); "argmax": per-row arg-max of the
    plan, as the reference code does (not a permutation: two tokens may share a target)."""
    plan = ot_plan(view, ref, eps, iterations)  # (B, r, r)
    if method == "argmax":
        return plan.argmax(dim=-1)
    if method != "hungarian":
        raise ValueError(f"align.match must be 'hungarian' or 'argmax' (got {method!r})")
    plans = plan.cpu().numpy()
    perm = np.stack([linear_sum_assignment(p, maximize=True)[1] for p in plans])
    return torch.from_numpy(perm).to(view.device)


def _gather_with_grad(z: torch.Tensor) -> torch.Tensor:
    """Concatenate z over processes; gradients flow into this process's own rows only."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return z
    parts = [torch.zeros_like(z) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, z.detach().contiguous())
    parts[dist.get_rank()] = z
    return torch.cat(parts)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `a` (B,D) and of `b` (B,D) are a positive pair, every other image of the
    global batch (all processes) a negative. Vectors are L2-normalised here."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    ga, gb = _gather_with_grad(a), _gather_with_grad(b)  # (P*B, D): every process holds the same batch size
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    target = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
    return 0.5 * (F.cross_entropy(a @ gb.T / temperature, target) + F.cross_entropy(b @ ga.T / temperature, target))


def koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo over the r vectors of each set: -mean log distance to the nearest neighbour. x (B,r,d).

    Lower when the vectors spread out on the sphere."""
    x = F.normalize(x.float(), dim=-1)
    sim = x @ x.transpose(1, 2)  # (B, r, r)
    sim = sim - 2 * torch.eye(x.shape[1], device=x.device)  # never pick yourself
    nn_idx = sim.argmax(dim=-1)  # (B, r)
    nn_vec = torch.gather(x, 1, nn_idx[..., None].expand_as(x))
    dist_nn = (x - nn_vec).norm(dim=-1)
    return -torch.log(dist_nn + eps).mean()


class AlignmentLoss(nn.Module):
    """The alignment objective over one batch of views; holds the two clustering heads."""

    def __init__(self, dim: int, cfg):
        super().__init__()
        self.cfg = cfg
        std = float(getattr(cfg, "prototype_std", 0.0))
        self.token_head = ClusteringHead(dim, cfg.head_hidden, cfg.head_bottleneck, cfg.token_prototypes, std)
        contrastive = getattr(cfg, "image_loss", "clustering") == "contrastive"  # then a projection head, no prototypes
        self.cls_head = ClusteringHead(dim, cfg.head_hidden, cfg.head_bottleneck, None if contrastive else cfg.cls_prototypes, std)

    def targets(self, token_logits: torch.Tensor, cls_logits: torch.Tensor):
        c = self.cfg
        b, r, k = token_logits.shape
        if c.token_balance == "slot":  # clusters balanced over the images, separately for each of the r slots
            q_tok = sinkhorn_knopp(token_logits.detach().transpose(0, 1), c.sinkhorn_temp, c.sinkhorn_iters).transpose(0, 1)
        else:  # "all": balanced over all B*r tokens together (the reference code)
            q_tok = sinkhorn_knopp(token_logits.detach().reshape(b * r, k), c.sinkhorn_temp, c.sinkhorn_iters).view(b, r, k)
        q_cls = None if cls_logits is None else sinkhorn_knopp(cls_logits.detach(), c.sinkhorn_temp, c.sinkhorn_iters)
        return q_tok, q_cls

    def forward(self, encode, main: dict, views: dict, teacher: dict | None = None) -> tuple[torch.Tensor, dict]:
        """encode(images, keep) -> (cls, dense, S) is the student encoder; main holds the main view's
        student outputs `cls`, `sparse`; teacher (optional) the EMA teacher's `cls`, `sparse`, `token_logits`,
        `cls_logits` on the main view. Returns (weighted total, dict of terms and diagnostics)."""
        c, w = self.cfg, self.cfg.weights
        s0, c0 = main["sparse"], main["cls"]  # (B,r,d), (B,d)
        contrastive = c.image_loss == "contrastive"
        pool = (lambda cls, sparse: sparse.mean(1)) if c.image_feature == "tokens" else (lambda cls, sparse: cls)  # noqa: E731
        # the main view's logits are the Sinkhorn targets' (without a teacher): float32, 1/(1 + views) of the heads' FLOPs
        tok0 = self.token_head(s0, float32=teacher is None)  # (B,r,K)
        cls0 = self.cls_head(pool(c0, s0), float32=teacher is None)  # (B,Kc) prototype logits, or (B,bottleneck) embedding when contrastive
        if teacher is None:
            q_tok, q_cls = self.targets(tok0, None if contrastive else cls0)
            ref = s0.detach()
        else:
            q_tok, q_cls = self.targets(teacher["token_logits"], None if contrastive else teacher["cls_logits"])
            ref = teacher["sparse"]
        terms = {"token_self": clustering_loss(tok0, q_tok, c.student_temp), "koleo": koleo(s0)}
        if not contrastive:
            terms["cls_self"] = clustering_loss(cls0, q_cls, c.student_temp)

        def image_terms(cls_v, sparse_v, n):  # the image-level feature of n views stacked (n*B,...) against the main view's
            emb = self.cls_head(pool(cls_v, sparse_v)).chunk(n)  # one head pass; each view's term on its own batch
            if contrastive:  # negatives come from the view's own batch
                return sum(info_nce(e, cls0, c.contrastive_temp) for e in emb) / n
            return sum(clustering_loss(e, q_cls, c.student_temp) for e in emb) / n

        logs = {}
        m = len(views["masked"])
        if m:  # all masked views in one encoder pass (equal shapes): (M*B,3,G,G), keep (M*B,K)
            cls_m, _, s_m = encode(torch.cat(views["masked"]), torch.cat(views["keep"]))  # (M*B,d), (M*B,K,d), (M*B,r,d)
            perm = match_tokens(s_m.detach(), ref.repeat(m, 1, 1), c.ot_eps, c.ot_iters, c.match)  # (M*B,r)
            target = torch.gather(q_tok.repeat(m, 1, 1), 1, perm[..., None].expand(-1, -1, q_tok.shape[-1]))
            # every view holds B*r tokens: the mean over all of them is the mean of the views' means
            terms.update(token_masked=clustering_loss(self.token_head(s_m), target, c.student_temp),
                         cls_masked=image_terms(cls_m, s_m, m), koleo_masked=koleo(s_m))
            logs["match_identity"] = (perm == torch.arange(perm.shape[1], device=perm.device)).float().mean()
        n = len(views["local"])
        if n:  # all local crops in one pass: (n*B,3,l,l)
            cls_l, _, s_l = encode(torch.cat(views["local"]), None)
            terms["cls_local"] = image_terms(cls_l, s_l, n)
        total = sum(getattr(w, k) * v for k, v in terms.items())
        with torch.no_grad():
            used = torch.zeros(q_tok.shape[-1], device=q_tok.device)
            used[tok0.argmax(-1).flatten()] = 1
            logs["token_proto_used"] = _all_reduce(used).clamp(max=1).mean()
            if not contrastive:
                usedc = torch.zeros(q_cls.shape[-1], device=q_cls.device)
                usedc[cls0.argmax(-1)] = 1
                logs["cls_proto_used"] = _all_reduce(usedc).clamp(max=1).mean()
        # logs stay 0-d tensors on the device: the trainer reads them at its log steps only (stellar_tok.training.engine.as_floats)
        return total, {**{k: v.detach() for k, v in terms.items()}, **logs}
