"""Sinkhorn marginals, OT matching, KoLeo, GAN adaptive weight, views and masks."""
import pytest
import torch
from conftest import TINY_ALIGN, TINY_MODEL, tiny_align_config
from omegaconf import OmegaConf

from stellar_tok.losses.alignment import AlignmentLoss, clustering_loss, koleo, match_tokens, ot_plan, sinkhorn_knopp
from stellar_tok.config import ViewsConfig
from stellar_tok.errors import UserError
from stellar_tok.losses.reconstruction import (PatchDiscriminator, ReconstructionLoss, adaptive_weight, describe_gan_start,
                                               gan_start_step, hinge_d_loss)
from stellar_tok.data.views import make_views, sample_keep


def test_sinkhorn_marginals():
    torch.manual_seed(0)
    logits = torch.randn(512, 32) * 3 + torch.linspace(0, 4, 32)  # some clusters strongly preferred
    q = sinkhorn_knopp(logits, temperature=0.5, iterations=50)
    torch.testing.assert_close(q.sum(1), torch.ones(512))  # each token a distribution
    torch.testing.assert_close(q.sum(0), torch.full((32,), 512 / 32), rtol=1e-3, atol=1e-3)  # balanced clusters
    # with few iterations the cluster marginals are already much closer to uniform than the softmax's
    q3 = sinkhorn_knopp(logits, temperature=0.5, iterations=3)
    soft = (logits / 0.5).softmax(-1)
    assert q3.sum(0).std() < 0.5 * soft.sum(0).std()


def test_clustering_loss_is_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    target = torch.tensor([[1.0, 0.0, 0.0]])
    expected = -torch.log_softmax(logits / 0.12, -1)[0, 0]
    torch.testing.assert_close(clustering_loss(logits, target, 0.12), expected)


def test_ot_matcher_recovers_permutation():
    torch.manual_seed(0)
    ref = torch.randn(8, 16, 32)
    perms = torch.stack([torch.randperm(16) for _ in range(8)])
    view = torch.gather(ref, 1, perms[..., None].expand(-1, -1, 32)) + 0.05 * torch.randn(8, 16, 32)
    got = match_tokens(view, ref, method="hungarian")
    assert torch.equal(got, perms)
    plan = ot_plan(view, ref, iterations=200)
    torch.testing.assert_close(plan.sum(-1), torch.full((8, 16), 1 / 16), atol=1e-4, rtol=0)


def test_hungarian_is_a_permutation_even_when_argmax_is_not():
    ref = torch.randn(1, 4, 8)
    view = ref[:, [0, 0, 0, 0]] + 0.01 * torch.randn(1, 4, 8)  # every view token looks like ref token 0
    arg = match_tokens(view, ref, method="argmax")
    hun = match_tokens(view, ref, method="hungarian")
    assert len(set(arg[0].tolist())) < 4
    assert sorted(hun[0].tolist()) == [0, 1, 2, 3]


def test_koleo_lower_when_spread():
    torch.manual_seed(0)
    clumped = torch.randn(1, 1, 16) + 0.01 * torch.randn(1, 16, 16)
    spread = torch.eye(16)[None]
    assert koleo(spread) < koleo(clumped)
    x = clumped.clone().requires_grad_(True)
    koleo(x).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_alignment_loss_runs_and_backprops(tiny_tokenizer):
    cfg = tiny_align_config()
    vcfg = OmegaConf.merge(OmegaConf.structured(ViewsConfig), {"blur_kernel": 5})
    loss_fn = AlignmentLoss(64, cfg)
    tiny_tokenizer.train()
    views = make_views(torch.rand(4, 3, 32, 32) * 2 - 1, vcfg, torch.Generator().manual_seed(0), 4)
    out = tiny_tokenizer(views["main"])
    total, logs = loss_fn(tiny_tokenizer.encode_features, out, views)
    total.backward()
    for key in ("token_self", "cls_self", "token_masked", "cls_masked", "cls_local", "koleo", "koleo_masked", "match_identity"):
        assert key in logs
    assert tiny_tokenizer.sparse_tokens.grad.abs().sum() > 0
    assert loss_fn.token_head.prototypes.weight.grad.abs().sum() > 0


def test_views_shapes_and_per_image_randomness():
    cfg = OmegaConf.merge(OmegaConf.structured(ViewsConfig), {"blur_kernel": 5, "jitter_p": 1.0, "grayscale_p": 0.0, "blur_p": 0.0})
    x = torch.rand(1, 3, 32, 32).repeat(16, 1, 1, 1) * 2 - 1  # 16 copies of one image
    v = make_views(x, cfg, torch.Generator().manual_seed(0), 4)
    assert v["main"].shape == (16, 3, 32, 32) and len(v["masked"]) == 2 and len(v["local"]) == 4
    assert v["local"][0].shape == (16, 3, 16, 16)
    assert v["keep"][0].shape == (16, 16)  # 64 patches, 75% masked
    # copies of the same image get different colour jitter: not one draw per batch
    means = v["masked"][0].mean(dim=(2, 3))
    assert means.std(0).max() > 0.01
    for t in [v["main"], *v["masked"], *v["local"]]:
        assert t.min() >= -1.0001 and t.max() <= 1.0001


def test_focal_mask_is_biased_but_soft():
    g = torch.Generator().manual_seed(0)
    keep = sample_keep(2000, 14, 0.8, g, "cpu", focal_p=1.0, focal_sigma=(0.1, 0.1))
    assert keep.shape == (2000, 39)
    rows, cols = keep // 14, keep % 14
    # kept patches lie closer together than uniformly random ones
    spread_focal = (rows.float().std(1) + cols.float().std(1)).mean()
    uni = sample_keep(2000, 14, 0.8, g, "cpu", focal_p=0.0)
    spread_uni = ((uni // 14).float().std(1) + (uni % 14).float().std(1)).mean()
    assert spread_focal < 0.8 * spread_uni
    assert all(len(set(k.tolist())) == 39 for k in keep[:50])  # no duplicates


def test_gan_adaptive_weight_balances_gradients():
    w = torch.nn.Parameter(torch.randn(3, 3))
    x = torch.randn(5, 3)
    nll = (x @ w).pow(2).mean()
    g = 10 * (x @ w).mean()
    aw = adaptive_weight(nll, g, w)
    gn = torch.autograd.grad(nll, w, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, w, retain_graph=True)[0].norm()
    torch.testing.assert_close(aw, gn / (gg + 1e-4))
    # after weighting, the GAN gradient has the norm of the reconstruction gradient
    torch.testing.assert_close(torch.autograd.grad(aw * g, w)[0].norm(), gn, rtol=1e-3, atol=1e-6)


def test_hinge_loss_and_gan_start():
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 1
    cfg = OmegaConf.create({"pixel": "l1", "pixel_weight": 1.0, "lpips_weight": 0.0, "lpips_random_backbone": True,
                            "gan_weight": 0.5, "gan_start": 10, "gan_max_adaptive": 1e4})
    rl = ReconstructionLoss(cfg)
    disc = PatchDiscriminator(16, 2)
    recon = torch.zeros(2, 3, 32, 32, requires_grad=True)
    layer = torch.nn.Conv2d(3, 3, 1)
    out = layer(recon + 0.1)
    _, logs = rl.generator_loss(out, torch.zeros(2, 3, 32, 32), step=5, disc=disc, last_layer=layer.weight)
    assert "gan_g" not in logs
    loss, logs = rl.generator_loss(out, torch.zeros(2, 3, 32, 32), step=10, disc=disc, last_layer=layer.weight)
    # from step gan_start: loss = pixel + gan_weight * w * g, w the VQGAN balance of the two gradients at the last layer
    pix, g = out.abs().mean(), -disc(out).mean()
    w = adaptive_weight(pix, g, layer.weight, 1e4)
    assert logs["gan_adaptive_weight"].item() == pytest.approx(w.item(), rel=1e-5) and w > 0
    assert loss.item() == pytest.approx(logs["pixel"].item() + 0.5 * w.item() * logs["gan_g"].item(), rel=1e-5, abs=1e-6)
    # the weight is clamped to gan_max_adaptive
    rl_capped = ReconstructionLoss(OmegaConf.merge(cfg, {"gan_max_adaptive": 0.5 * w.item()}))
    _, logs = rl_capped.generator_loss(out, torch.zeros(2, 3, 32, 32), step=10, disc=disc, last_layer=layer.weight)
    assert logs["gan_adaptive_weight"].item() == pytest.approx(0.5 * w.item(), rel=1e-5)



def test_gan_start_is_a_fraction_of_the_run_or_a_step():
    """recon.gan_start in [0, 1) is a fraction of the run's length, resolved at start; >= 1 a step; a start the run
    never reaches (vit_b16's old 100,000 on 16 GPUs: 93,836 steps) is refused in one line."""
    cfg = OmegaConf.create({"pixel": "l1", "pixel_weight": 1.0, "lpips_weight": 0.0, "lpips_random_backbone": True,
                            "gan_weight": 0.5, "gan_start": 0.5, "gan_max_adaptive": 1e4})
    assert gan_start_step(cfg, 93836) == 46918
    assert describe_gan_start(cfg, 93836) == "GAN from step 46,918 (recon.gan_start=0.5 of 93,836 steps)"
    rl = ReconstructionLoss(cfg, total_steps=10)
    assert [rl.gan_active(s) for s in (4, 5, 9)] == [False, True, True]
    steps = OmegaConf.merge(cfg, {"gan_start": 150})  # a step count: the rehearsal's recon.gan_start=150 of 300 steps
    assert gan_start_step(steps, 300) == 150 and describe_gan_start(steps, 300) == "GAN from step 150 (recon.gan_start=150)"
    assert ReconstructionLoss(steps, total_steps=300).gan_start == 150
    with pytest.raises(UserError, match=r"recon.gan_start=100000 starts the GAN at step 100,000, which a run of 93,836 steps never reaches"):
        gan_start_step(OmegaConf.merge(cfg, {"gan_start": 100000}), 93836)
    assert ReconstructionLoss(OmegaConf.merge(cfg, {"gan_start": 0.96}), total_steps=10).gan_start == 9  # a fraction: always reached
    assert gan_start_step(OmegaConf.merge(cfg, {"gan_start": 0.533}), 1) == 0  # a one-step smoke run of the ImageNet configs


def test_generator_gan_term_leaves_the_discriminator_alone():
    """One GAN step as the trainer runs it (generator loss backward, then the discriminator's hinge loss backward and
    its optimiser step) moves the discriminator exactly as the hinge loss alone would."""
    import copy

    cfg = OmegaConf.create({"pixel": "l1", "pixel_weight": 1.0, "lpips_weight": 0.0, "lpips_random_backbone": True,
                            "gan_weight": 0.5, "gan_start": 0, "gan_max_adaptive": 1e4})
    rl = ReconstructionLoss(cfg)
    torch.manual_seed(0)
    disc = PatchDiscriminator(16, 2)
    alone = copy.deepcopy(disc)
    layer = torch.nn.Conv2d(3, 3, 1)
    recon, target = layer(torch.rand(2, 3, 32, 32)), torch.rand(2, 3, 32, 32) * 2 - 1
    opt, opt_alone = (torch.optim.AdamW(d.parameters(), lr=1e-2) for d in (disc, alone))

    g_loss, logs = rl.generator_loss(recon, target, step=0, disc=disc, last_layer=layer.weight)
    g_loss.backward()
    assert "gan_g" in logs and layer.weight.grad is not None  # the term trains the decoder ...
    assert all(p.grad is None for p in disc.parameters())  # ... and not the discriminator
    assert all(p.requires_grad for p in disc.parameters())  # whose flags are restored
    for d, o in ((disc, opt), (alone, opt_alone)):
        rl.discriminator_loss(d, recon, target)[0].backward()
        o.step()
    for p, q in zip(disc.parameters(), alone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_slot_balance_defeats_token_identity():
    """Logits that depend only on the token slot: balancing over all B*r tokens lets each slot keep its own
    clusters (identity shortcut), balancing per slot spreads every slot's images over all clusters."""
    torch.manual_seed(0)
    b, r, k = 64, 4, 4
    logits = torch.eye(r, k)[None].expand(b, r, k) * 5 + 0.01 * torch.randn(b, r, k)
    q_all = sinkhorn_knopp(logits.reshape(b * r, k), 0.5, 20).view(b, r, k)
    q_slot = sinkhorn_knopp(logits.transpose(0, 1), 0.5, 20).transpose(0, 1)
    assert q_all[:, 0, 0].mean() > 0.9  # slot 0 always goes to cluster 0
    torch.testing.assert_close(q_slot.sum(0), torch.full((r, k), b / k), rtol=1e-2, atol=1e-2)


def test_ema_teacher_is_frozen_and_follows_student(tiny_tokenizer):
    from stellar_tok.training.objective import TokenizerWithHeads

    cfg = tiny_align_config(teacher_momentum=0.5)
    obj = TokenizerWithHeads(tiny_tokenizer, cfg).train()
    assert not obj.teacher.training and obj.tokenizer.training
    assert not any(p.requires_grad for p in obj.teacher.parameters())
    with torch.no_grad():
        obj.tokenizer.cls_token.add_(1.0)
    before = obj.teacher["tokenizer"].cls_token.clone()
    obj.update_teacher()
    torch.testing.assert_close(obj.teacher["tokenizer"].cls_token, before + 0.5)


def test_info_nce_prefers_matching_pairs():
    from stellar_tok.losses.alignment import info_nce

    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 8, generator=g)
    matched = info_nce(a, a + 0.01 * torch.randn(16, 8, generator=g), 0.2)
    shuffled = info_nce(a, a[torch.randperm(16, generator=g)], 0.2)
    assert matched < 0.5 < torch.log(torch.tensor(16.0)) < shuffled


def test_contrastive_image_loss_on_mean_tokens_trains():
    """align.image_loss=contrastive with image_feature=tokens: the terms exist, are finite and have gradients."""
    from stellar_tok import StellarTokenizer
    from stellar_tok.config import Config
    from stellar_tok.training.objective import TokenizerWithHeads

    cfg = OmegaConf.structured(Config)
    cfg.align.merge_with({**TINY_ALIGN, "image_loss": "contrastive", "image_feature": "tokens", "token_prototypes": 8})
    cfg.views.merge_with({"global_crops": 2, "local_crops": 1})
    torch.manual_seed(0)
    tok = StellarTokenizer(**TINY_MODEL)
    obj = TokenizerWithHeads(tok, cfg.align)
    views = make_views(torch.rand(8, 3, 32, 32) * 2 - 1, cfg.views, torch.Generator().manual_seed(0), 4)
    out = obj(views)
    logs = out["align_logs"]
    assert "cls_self" not in logs and {"cls_masked", "cls_local", "token_masked"} <= set(logs)
    assert 0 < logs["cls_masked"] < 2 * torch.log(torch.tensor(8.0)).item()
    out["align_loss"].backward()
    assert tok.sparse_tokens.grad.abs().sum() > 0


def _per_view_alignment(align, encode, main, views):
    """The alignment objective with one encoder pass per view (the plain loop the batched forward replaced)."""
    from stellar_tok.losses.alignment import info_nce

    c, w = align.cfg, align.cfg.weights
    contrastive = c.image_loss == "contrastive"
    pool = (lambda cls, s: s.mean(1)) if c.image_feature == "tokens" else (lambda cls, s: cls)  # noqa: E731
    s0, c0 = main["sparse"], main["cls"]
    tok0, cls0 = align.token_head(s0), align.cls_head(pool(c0, s0))
    q_tok, q_cls = align.targets(tok0, None if contrastive else cls0)
    terms = {"token_self": clustering_loss(tok0, q_tok, c.student_temp), "koleo": koleo(s0)}
    if not contrastive:
        terms["cls_self"] = clustering_loss(cls0, q_cls, c.student_temp)
    image = (lambda e: info_nce(e, cls0, c.contrastive_temp)) if contrastive else (lambda e: clustering_loss(e, q_cls, c.student_temp))  # noqa: E731
    m, tm, cm, km = len(views["masked"]), 0.0, 0.0, 0.0
    for img, keep in zip(views["masked"], views["keep"]):
        cls_m, _, s_m = encode(img, keep)
        perm = match_tokens(s_m.detach(), s0.detach(), c.ot_eps, c.ot_iters, c.match)
        target = torch.gather(q_tok, 1, perm[..., None].expand(-1, -1, q_tok.shape[-1]))
        tm = tm + clustering_loss(align.token_head(s_m), target, c.student_temp) / m
        cm = cm + image(align.cls_head(pool(cls_m, s_m))) / m
        km = km + koleo(s_m) / m
    terms.update(token_masked=tm, cls_masked=cm, koleo_masked=km)
    terms["cls_local"] = sum(image(align.cls_head(pool(*encode(img, None)[::2]))) for img in views["local"]) / len(views["local"])
    return sum(getattr(w, k) * v for k, v in terms.items()), terms


@pytest.mark.parametrize("image_loss", ["clustering", "contrastive"])
def test_batched_views_give_the_per_view_losses_and_gradients(image_loss):
    """All masked views in one encoder pass, all local crops in another: the same terms and gradients as a pass per view."""
    from stellar_tok import StellarTokenizer

    torch.manual_seed(0)
    tok = StellarTokenizer(**TINY_MODEL)
    cfg = tiny_align_config(image_loss=image_loss)
    align = AlignmentLoss(TINY_MODEL["width"], cfg)
    vcfg = OmegaConf.merge(OmegaConf.structured(ViewsConfig), {"global_crops": 3, "local_crops": 2})
    views = make_views(torch.rand(6, 3, 32, 32) * 2 - 1, vcfg, torch.Generator().manual_seed(0), 4)
    params = [*tok.parameters(), *align.parameters()]
    results = []
    for fn in (lambda main: align(tok.encode_features, main, views), lambda main: _per_view_alignment(align, tok.encode_features, main, views)):
        main = tok(views["main"])
        total, terms = fn(main)
        grads = torch.autograd.grad(total, params, allow_unused=True)
        results.append((total.detach(), {k: float(torch.as_tensor(v).detach()) for k, v in terms.items()}, grads))
    (t_batched, terms_batched, g_batched), (t_loop, terms_loop, g_loop) = results
    torch.testing.assert_close(t_batched, t_loop, rtol=1e-5, atol=1e-6)
    for k, v in terms_loop.items():
        assert abs(terms_batched[k] - v) <= 1e-5 * max(1.0, abs(v)), (k, terms_batched[k], v)
    for a, b in zip(g_batched, g_loop):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ the masked-view target and the slot balance
def _align(**kw):
    torch.manual_seed(0)
    return AlignmentLoss(16, tiny_align_config(token_prototypes=8, **kw))


def _permuted_masked_views(b=3, r=8, d=16, m=2, seed=0):
    """Main-view S (B,r,d), and an encoder whose m masked views hold the same tokens in known orders: view v's
    token j is main token perms[v][b, j] (no token kept in place)."""
    g = torch.Generator().manual_seed(seed)
    s0 = torch.randn(b, r, d, generator=g)

    def cycle():  # a random r-cycle: token sigma[i] goes to sigma[i+1], so no token stays in place
        sigma, perm = torch.randperm(r, generator=g), torch.empty(r, dtype=torch.long)
        perm[sigma] = sigma.roll(-1)
        return perm

    perms = [torch.stack([cycle() for _ in range(b)]) for _ in range(m)]  # (B, r) per view
    s_m = torch.cat([torch.gather(s0, 1, p[..., None].expand(-1, -1, d)) for p in perms])  # (m*B, r, d)
    cls_m = torch.randn(m * b, d, generator=g)

    def encode(images, keep):
        assert images.shape[0] == m * b and keep.shape[0] == m * b  # all masked views in one pass
        return cls_m, None, s_m

    views = {"masked": [torch.zeros(b, 3, 8, 8)] * m, "keep": [torch.zeros(b, 4, dtype=torch.long)] * m, "local": []}
    main = {"sparse": s0, "cls": torch.randn(b, d, generator=g)}
    return main, views, encode, perms, s_m


def test_masked_view_target_is_the_matched_teacher_assignment():
    """Masked views whose tokens are known permutations of the main view's: the masked-token term is the
    cross-entropy against the teacher's assignment of each token's matched main-view partner."""
    align = _align(sinkhorn_iters=10)
    main, views, encode, perms, s_m = _permuted_masked_views()
    s0 = main["sparse"]
    # the teacher sees the main view as the student does, its heads are the student's (as the EMA copy at step 0)
    teacher = {"sparse": s0, "cls": main["cls"], "token_logits": align.token_head(s0).detach(), "cls_logits": align.cls_head(main["cls"]).detach()}
    with torch.no_grad():
        _, logs = align(encode, main, views, teacher)
        q_tok, _ = align.targets(teacher["token_logits"], teacher["cls_logits"])
        pred = align.token_head(s_m)
        k = q_tok.shape[-1]
        matched = torch.cat([torch.gather(q_tok, 1, p[..., None].expand(-1, -1, k)) for p in perms])
        unmatched = q_tok.repeat(len(perms), 1, 1)  # each masked token against the main token in its own slot
        want = clustering_loss(pred, matched, align.cfg.student_temp).item()
        identity = clustering_loss(pred, unmatched, align.cfg.student_temp).item()
    assert logs["match_identity"] == 0.0  # every token was moved, and the matcher saw it
    assert logs["token_masked"] == pytest.approx(want, rel=1e-5)
    # the matched target is what the student predicts for that token: a lower loss than slot-by-slot targets
    assert want < identity - 0.1, (want, identity)


def test_masked_view_target_comes_from_the_teacher_not_the_student():
    """With an EMA teacher, the masked views' targets are the teacher's assignments (permuted), not the student's."""
    align = _align(sinkhorn_iters=10)
    main, views, encode, perms, s_m = _permuted_masked_views(seed=1)
    s0 = main["sparse"]
    g = torch.Generator().manual_seed(7)
    teacher = {"sparse": s0, "cls": main["cls"], "token_logits": torch.randn(3, 8, 8, generator=g) * 3,
               "cls_logits": torch.randn(3, 8, generator=g)}
    with torch.no_grad():
        _, logs = align(encode, main, views, teacher)
        pred = align.token_head(s_m)
        expected = {}
        for name, logits in (("teacher", teacher["token_logits"]), ("student", align.token_head(s0))):
            q = align.targets(logits, None)[0]
            target = torch.cat([torch.gather(q, 1, p[..., None].expand(-1, -1, 8)) for p in perms])
            expected[name] = clustering_loss(pred, target, align.cfg.student_temp).item()
    assert logs["token_masked"] == pytest.approx(expected["teacher"], rel=1e-5)
    assert abs(expected["teacher"] - expected["student"]) > 0.1


def _slot_skewed_logits(b=32, r=4, k=4, seed=0):
    """Token logits that depend on the slot only: slot i prefers cluster i."""
    g = torch.Generator().manual_seed(seed)
    return torch.eye(r, k)[None].expand(b, r, k) * 5 + 0.1 * torch.randn(b, r, k, generator=g)


def test_token_balance_slot_balances_each_slot_through_alignment_loss():
    """align.token_balance=slot: every slot spreads its images evenly over the clusters; =all: balanced over all
    B*r tokens together, so a slot may keep its own cluster."""
    b, r, k = 32, 4, 4
    logits = _slot_skewed_logits(b, r, k)
    q_slot, q_cls = _align(token_balance="slot", sinkhorn_iters=50, sinkhorn_temp=0.5).targets(logits, torch.randn(b, 8))
    q_all, _ = _align(token_balance="all", sinkhorn_iters=50, sinkhorn_temp=0.5).targets(logits, None)
    assert q_slot.shape == q_all.shape == (b, r, k) and q_cls.shape == (b, 8)
    torch.testing.assert_close(q_slot.sum(-1), torch.ones(b, r))  # every token a distribution
    torch.testing.assert_close(q_slot.sum(0), torch.full((r, k), b / k), rtol=1e-2, atol=1e-2)  # per slot balanced
    torch.testing.assert_close(q_all.sum((0, 1)), torch.full((k,), b * r / k), rtol=1e-2, atol=1e-2)  # overall balanced
    assert q_all[:, 0, 0].mean() > 0.9 and q_slot[:, 0, 0].mean() < 0.5  # only "all" lets slot 0 keep cluster 0
    # the slot branch solves one problem per slot: Sinkhorn on slot i's B tokens alone
    for i in range(r):
        torch.testing.assert_close(q_slot[:, i], sinkhorn_knopp(logits[:, i], 0.5, 50))


def test_token_balance_slot_sets_the_token_terms():
    """Through the forward pass: token_self and token_masked are computed against the per-slot targets."""
    main, views, encode, perms, s_m = _permuted_masked_views(b=8, r=8, seed=2)
    s0 = main["sparse"]
    losses, targets = {}, {}
    for balance in ("slot", "all"):
        align = _align(token_balance=balance, sinkhorn_iters=20)
        teacher = {"sparse": s0, "cls": main["cls"], "token_logits": torch.eye(8)[None].expand(8, 8, 8) * 0.5,
                   "cls_logits": align.cls_head(main["cls"]).detach()}
        with torch.no_grad():
            _, logs = align(encode, main, views, teacher)
            q = align.targets(teacher["token_logits"], None)[0]
            torch.testing.assert_close(q, sinkhorn_knopp(teacher["token_logits"].transpose(0, 1), 0.06, 20).transpose(0, 1)
                                       if balance == "slot" else sinkhorn_knopp(teacher["token_logits"].reshape(64, 8), 0.06, 20).view(8, 8, 8))
            want_self = clustering_loss(align.token_head(s0), q, align.cfg.student_temp).item()
            target = torch.cat([torch.gather(q, 1, p[..., None].expand(-1, -1, 8)) for p in perms])
            want_masked = clustering_loss(align.token_head(s_m), target, align.cfg.student_temp).item()
        assert logs["token_self"] == pytest.approx(want_self, rel=1e-5)
        assert logs["token_masked"] == pytest.approx(want_masked, rel=1e-5)
        losses[balance], targets[balance] = logs["token_self"], q
    # slot-skewed logits: the branch changes the targets (per slot, slot i no longer keeps cluster i) and the loss
    assert targets["all"][:, 0, 0].mean() > 0.9 > 0.5 > targets["slot"][:, 0, 0].mean()
    assert abs(losses["slot"] - losses["all"]) > 0.01
