"""DeepLatent's side modules (spec 2.5, 2.9; oracles 10, 11, 13, 14): the grid resize, the scale
head's loss, the Gaussian modulation and its sufficient statistics, the LatentFormer against a
plain-torch reference with 2-D RoPE, gradients, stage placement and the dist checkpoint at TP=1.
The TP=2 parity and reshard are in test_latentformer_parallel.py (slow)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_latent.latent.deeplatent_modules import (GaussianStats, LatentGrid, ScaleHead,
                                                       gaussian_kl_from_stats, gaussian_log_prob,
                                                       gaussian_log_ratio_from_stats,
                                                       grid_coords, latent_coords, modulate)

D, HEADS = 32, 4  # head width 8: two rotary frequencies per axis


# ---- oracle 13: the grid resize ------------------------------------------------------------------
def test_grid_resize_oracle_13():
    grid = LatentGrid(1, size=2)
    with torch.no_grad():
        grid.queries.copy_(torch.tensor([[0.0, 1.0], [2.0, 3.0]]).unsqueeze(-1))
    assert grid.resized(1, 1).item() == pytest.approx(1.5, abs=1e-7)
    assert torch.equal(grid.resized(2, 2), grid.queries.reshape(4, 1))  # same size: identity


def test_grid_resize_shapes_row_major_and_bounds():
    torch.manual_seed(0)
    grid = LatentGrid(D)  # 16 x 16, init N(0, 0.02^2)
    assert 0.015 < grid.queries.std().item() < 0.025
    same = grid.resized(16, 16)
    assert torch.allclose(same, grid.queries.reshape(256, D), atol=1e-7)
    assert torch.equal(same[3 * 16 + 5], same.view(16, 16, D)[3, 5])  # row-major
    assert grid.resized(3, 5).shape == (15, D)
    assert grid.resized(7, 2).shape == (14, D)
    with pytest.raises(ValueError):
        grid.resized(17, 4)


# ---- oracle 11: the scale head ---------------------------------------------------------------
def test_scale_loss_oracle_11():
    head = ScaleHead(D)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
    h_s = torch.randn(D)
    loss = head.loss(h_s, 5, 7)
    assert loss.item() == pytest.approx(2 * math.log(16), abs=1e-6)
    assert (0.5 * loss).item() == pytest.approx(2.772589, abs=1e-6)
    # several blocks, H != W per block
    per_block = head.loss(torch.randn(3, D), torch.tensor([1, 16, 4]), torch.tensor([2, 3, 16]),
                          reduction="none")
    assert per_block.shape == (3,) and torch.allclose(per_block, torch.full((3,), 2 * math.log(16)))


def test_scale_head_predicts_sizes_from_1():
    head = ScaleHead(D)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.h.bias[2] = 1.0  # class 2 = H of 3
        head.w.bias[15] = 1.0  # W of 16
    h, w = head.predict(torch.randn(2, D))
    assert h.tolist() == [3, 3] and w.tolist() == [16, 16]
    assert head.loss(torch.randn(D), 3, 16) < 2 * math.log(16)


# ---- oracle 10: the Gaussian modulation and its sufficient statistics ------------------------
def test_modulation_and_log_ratio_oracle_10():
    # spec: X = [1, 2], gamma_old = 1 multiplying directly, i.e. 0 in our (1 + gamma) form
    x = torch.tensor([[1.0], [2.0]])
    eps = torch.tensor([[0.2], [-0.4]])
    a, rec = modulate(x, torch.zeros(1), torch.zeros(1), 0.5, noise=True, eps=eps,
                      keep_action=True)
    assert torch.allclose(a, torch.tensor([[1.1], [1.8]]))
    assert torch.equal(rec.action, a)
    s = rec.stats
    assert (s.s1.item(), s.s2.item(), s.n) == (3.0, 5.0, 2)
    assert s.xe.item() == pytest.approx(-0.6) and s.e1.item() == pytest.approx(-0.2)
    # theta: spec gamma = 1.5 (multiplying) = 0.5 here, beta = 0.1 -> mu_theta = [1.6, 3.1]
    g, b = torch.tensor([0.5]), torch.tensor([0.1])
    mu_theta = (1 + g) * x + b
    direct = gaussian_log_prob(a, mu_theta, 0.5) - gaussian_log_prob(a, x, 0.5)
    assert direct.item() == pytest.approx(-3.78, abs=1e-5)
    via_stats = gaussian_log_ratio_from_stats(g, b, rec.gamma, rec.beta, s, 0.5)
    assert via_stats.item() == pytest.approx(-3.78, abs=1e-5)


def test_log_ratio_and_kl_from_stats_equal_direct_forms():
    gen = torch.Generator().manual_seed(0)
    n, c, sigma = 5, 3, 0.3
    x = torch.randn(n, c, generator=gen, dtype=torch.float64)
    g_old, b_old, g, b, g_ref, b_ref = torch.randn(6, c, generator=gen, dtype=torch.float64)
    g.requires_grad_(True)
    b.requires_grad_(True)
    eps = torch.randn(n, c, generator=gen, dtype=torch.float64)
    a, rec = modulate(x, g_old, b_old, sigma, noise=True, eps=eps)
    mu = lambda gg, bb: (1 + gg) * x + bb  # noqa: E731
    direct = gaussian_log_prob(a, mu(g, b), sigma) - gaussian_log_prob(a, mu(g_old, b_old), sigma)
    # fp32 statistics (what a bf16/fp32 rollout records): close; fp64: the algebra is exact
    stats32 = GaussianStats.of(x.float(), eps.float())
    via = gaussian_log_ratio_from_stats(g, b, g_old, b_old, stats32, sigma)
    stats64 = rec.stats
    assert stats64.s2.dtype == torch.float64 and stats64.n == n
    via64 = gaussian_log_ratio_from_stats(g, b, g_old, b_old, stats64, sigma)
    scale = max(1.0, abs(direct.item()))
    assert abs(via.item() - direct.item()) < 1e-5 * scale
    assert abs(via64.item() - direct.item()) < 1e-10 * scale
    for gd, gv in zip(torch.autograd.grad(direct, (g, b)), torch.autograd.grad(via64, (g, b))):
        assert torch.allclose(gd, gv, atol=1e-9)
    kl = gaussian_kl_from_stats(g, b, g_ref, b_ref, stats64, sigma)
    kl_direct = ((mu(g, b) - mu(g_ref, b_ref)) ** 2).sum() / (2 * sigma**2)
    assert abs(kl.item() - kl_direct.item()) < 1e-9 * max(1.0, kl_direct.item())


def test_kl_oracle_9_from_stats():
    # mu_theta - mu_ref = [0, 1] on X = [1, 2]: d_gamma = 1, d_beta = -1; sigma 0.5 -> 2.0
    stats = GaussianStats.of(torch.tensor([[1.0], [2.0]]), None)
    kl = gaussian_kl_from_stats(torch.tensor([1.0]), torch.tensor([-1.0]), torch.zeros(1),
                                torch.zeros(1), stats, 0.5)
    assert kl.item() == pytest.approx(2.0, abs=1e-6)


def test_zero_modulation_without_noise_is_the_identity():
    x = torch.randn(6, D)
    out, rec = modulate(x, torch.zeros(D), torch.zeros(D), 0.1, noise=False)
    assert torch.equal(out, x) and not rec.noisy and rec.action is None
    assert torch.count_nonzero(rec.stats.xe) == 0 and torch.count_nonzero(rec.stats.e1) == 0


# ---- oracle 14: 2-D RoPE coordinates and shift invariance ------------------------------------
def test_latent_coordinates_oracle_14():
    pos = latent_coords(2, 2, (4, 4))
    assert pos.tolist() == [[0.5, 0.5], [0.5, 2.5], [2.5, 0.5], [2.5, 2.5]]
    assert torch.equal(latent_coords(4, 4, (4, 4)), grid_coords(4, 4))  # same grid: the cells
    wide = latent_coords(1, 3, (2, 6))  # H != W: centres over a 2 x 6 image
    assert wide.tolist() == [[0.5, 0.5], [0.5, 2.5], [0.5, 4.5]]


def test_rope2d_logits_invariant_to_a_shift(megatron_single_rank):
    from megatron_latent.latent.latentformer import apply_rope2d
    from megatron_latent.models.qwen25vl.vision import VisionRotaryEmbedding

    torch.manual_seed(0)
    rot = VisionRotaryEmbedding(D // HEADS, 10000.0)
    q, k = torch.randn(2, 5, 1, HEADS, D // HEADS).unbind(0)
    pq, pk = torch.rand(5, 2) * 15, torch.rand(5, 2) * 15

    def logits(shift):
        qq, kk = apply_rope2d(q, rot(pq + shift)), apply_rope2d(k, rot(pk + shift))
        return torch.einsum("snd,tnd->nst", qq[:, 0], kk[:, 0])

    base = logits(torch.zeros(2))
    assert torch.allclose(base, logits(torch.tensor([3.7, -1.3])), atol=1e-5)
    # while moving the queries alone changes them: the positions are encoded
    qq = apply_rope2d(q, rot(pq + torch.tensor([3.7, -1.3])))
    assert not torch.allclose(base, torch.einsum("snd,tnd->nst", qq[:, 0],
                                                 apply_rope2d(k, rot(pk))[:, 0]), atol=1e-3)


# ---- the LatentFormer and the container (TP=1, megatron's parallel state) ------------------
def _modules(**kw):
    from megatron_latent.latent.latentformer import DeepLatentModules, parallel_linear_config

    kw = dict(dict(grid_size=16, mlp_hidden=16), **kw)
    return DeepLatentModules(parallel_linear_config(1, torch.float32), D, HEADS, **kw)


def _reference_latentformer(lf, z, f, pz, pf, theta=10000.0):
    """Spec 2.5 written out in plain torch (explicit softmax, Qwen2-VL ViT rotary)."""
    hd = D // HEADS
    quarter = hd // 2
    inv = 1.0 / theta ** (torch.arange(0, quarter, 2, dtype=torch.float64) / quarter)

    def rope(x, pos):  # x [n, heads, hd]
        ang = torch.cat([pos[:, :1].double() * inv, pos[:, 1:].double() * inv], dim=-1)
        ang = torch.cat([ang, ang], dim=-1)[:, None].float()
        x1, x2 = x.chunk(2, dim=-1)
        return x * ang.cos() + torch.cat([-x2, x1], dim=-1) * ang.sin()

    def rms(x, norm):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight

    def attn(m, x, kv, px, pkv):
        lin = lambda layer, t: F.linear(t, layer.weight, layer.bias)  # noqa: E731
        q = rope(lin(m.q_proj, x).view(-1, HEADS, hd), px)
        k = rope(lin(m.k_proj, kv).view(-1, HEADS, hd), pkv)
        v = lin(m.v_proj, kv).view(-1, HEADS, hd)
        p = torch.softmax(torch.einsum("snd,tnd->nst", q, k) / math.sqrt(hd), dim=-1)
        return lin(m.o_proj, torch.einsum("nst,tnd->snd", p, v).reshape(-1, D))

    for blk in lf.blocks:
        x = rms(z, blk.norm_sa)
        z = z + attn(blk.self_attn, x, x, pz, pz)
        z = z + attn(blk.cross_attn, rms(z, blk.norm_ca_q), rms(f, blk.norm_ca_kv), pz, pf)
        if blk.ffn is not None:
            h = F.gelu(F.linear(rms(z, blk.norm_ffn), blk.ffn.fc1.weight, blk.ffn.fc1.bias))
            z = z + F.linear(h, blk.ffn.fc2.weight, blk.ffn.fc2.bias)
    return z


@pytest.mark.parametrize("layers,ffn", [(1, False), (2, True)])
def test_latentformer_matches_plain_torch_reference(megatron_single_rank, layers, ffn):
    torch.manual_seed(1)
    mods = _modules(latentformer_layers=layers, latentformer_ffn=ffn)
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in mods.latentformer.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name or "bias" in name else 0.0))
    z, f = torch.randn(6, D), torch.randn(12, D)
    pz, pf = latent_coords(2, 3, (3, 4)), grid_coords(3, 4)
    out = mods.latentformer(z, f, pz, pf)
    ref = _reference_latentformer(mods.latentformer, z, f, pz, pf)
    assert out.shape == (6, D)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def test_latentformer_invariant_to_shifting_all_positions(megatron_single_rank):
    torch.manual_seed(2)
    lf = _modules().latentformer
    z, f = torch.randn(6, D), torch.randn(12, D)
    pz, pf = latent_coords(2, 3, (3, 4)), grid_coords(3, 4)
    shift = torch.tensor([2.25, -4.5])
    assert torch.allclose(lf(z, f, pz, pf), lf(z, f, pz + shift, pf + shift), atol=1e-5)


def test_build_latents_zero_init_is_the_plain_grid_path(megatron_single_rank):
    torch.manual_seed(3)
    mods = _modules()
    feats = torch.randn(12, D)
    lat, rec = mods.build_latents(torch.randn(D), torch.randn(D), 3, 5, feats, None, (3, 4),
                                  0.1, 0.2, noise=False)
    assert lat.shape == (15, D) and rec.grid == (3, 5)
    assert torch.count_nonzero(rec.q.gamma) == 0 and torch.count_nonzero(rec.f.beta) == 0
    plain = mods.latentformer(mods.grid.resized(3, 5), feats, latent_coords(3, 5, (3, 4)),
                              grid_coords(3, 4))
    assert torch.equal(lat, plain)
    assert rec.q.stats.n == 15 and rec.f.stats.n == 12 and not rec.q.noisy


def test_build_latents_noise_from_the_generator(megatron_single_rank):
    torch.manual_seed(4)
    mods = _modules()
    args = (torch.randn(D), torch.randn(D), 2, 3, torch.randn(12, D), grid_coords(3, 4), (3, 4),
            0.1, 0.2)
    run = lambda seed: mods.build_latents(  # noqa: E731
        *args, noise=True, generator=torch.Generator().manual_seed(seed), keep_actions=True)
    (lat_a, rec_a), (lat_b, _), (lat_c, _) = run(7), run(7), run(8)
    assert torch.equal(lat_a, lat_b) and not torch.allclose(lat_a, lat_c)
    # eps_q is drawn first: the action minus the (identity) mean, over sigma
    gen = torch.Generator().manual_seed(7)
    eps_q = torch.randn(6, D, generator=gen)
    assert torch.allclose(rec_a.q.action, mods.grid.resized(2, 3) + 0.1 * eps_q, atol=1e-7)
    assert torch.allclose(rec_a.q.stats.e1, eps_q.sum(0), atol=1e-5)
    eps_f = torch.randn(12, D, generator=gen)
    assert torch.allclose(rec_a.f.stats.xe, (args[4] * eps_f).sum(0), atol=1e-5)


def test_sampled_rows_equal_one_row_at_a_time(megatron_single_rank):
    """RL rollouts (`sample_latents`, r rows in one call): each row's latents are the
    LatentFormer on that row's own actions a = (1 + gamma) X + beta + sigma eps (eps_q [HW, r, d]
    then eps_f [n_f, r, d] from the generator), and its record's statistics give the direct
    Gaussian log-ratio of those actions for another (gamma, beta)."""
    from megatron_latent.latent.deeplatent_modules import gaussian_log_prob
    from megatron_latent.latent.deeplatent_rl import stats_log_ratio

    torch.manual_seed(5)
    mods = _modules()
    with torch.no_grad():  # past the zero init: each row its own modulation
        for mlp in (mods.mlp_l, mods.mlp_i):
            mlp.fc2.weight.normal_(0, 0.05)
    r, (h, w), sig = 3, (2, 3), (0.01, 0.2)
    hl, hi, feats = torch.randn(r, D), torch.randn(r, D), torch.randn(12, r, D)
    lat, recs = mods.sample_latents(hl, hi, h, w, feats, grid_coords(3, 4), (3, 4), *sig,
                                    generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    eps_q, eps_f = torch.randn(h * w, r, D, generator=gen), torch.randn(12, r, D, generator=gen)
    q = mods.grid.resized(h, w)
    assert lat.shape == (r, h * w, D) and len(recs) == r
    for i, rec in enumerate(recs):
        gq, bq = mods.mlp_l(hl[i])
        gf, bf = mods.mlp_i(hi[i])
        a_q = (1 + gq) * q + bq + sig[0] * eps_q[:, i]
        a_f = (1 + gf) * feats[:, i] + bf + sig[1] * eps_f[:, i]
        alone = mods.latentformer(a_q, a_f, latent_coords(h, w, (3, 4)), grid_coords(3, 4))
        torch.testing.assert_close(lat[i], alone, atol=1e-5, rtol=1e-5)
        assert rec.grid == (h, w) and rec.q.stats.n == h * w and rec.f.stats.n == 12
        for m, x, a, (g0, b0), s in ((rec.q, q, a_q, (gq, bq), sig[0]),
                                     (rec.f, feats[:, i], a_f, (gf, bf), sig[1])):
            torch.testing.assert_close(m.gamma, g0.detach())  # batched vs one-row matmul
            assert m.sigma == s
            g1, b1 = g0.detach() + 0.01 * torch.randn(D), b0.detach() + 0.01 * torch.randn(D)
            direct = (gaussian_log_prob(a.double(), ((1 + g1) * x + b1).double(), s)
                      - gaussian_log_prob(a.double(), ((1 + g0) * x + b0).double(), s))
            ours = stats_log_ratio(torch.stack([g1, b1]), torch.stack([m.gamma, m.beta]),
                                   torch.stack([m.stats.s1, m.stats.s2, m.stats.xe, m.stats.e1]),
                                   torch.tensor(float(m.stats.n)), torch.tensor(s))
            assert ours.item() == pytest.approx(direct.item(), rel=1e-4, abs=1e-3)


def test_gradients_reach_grid_mlps_and_latentformer(megatron_single_rank):
    torch.manual_seed(5)
    mods = _modules()
    feats = torch.randn(12, D, requires_grad=True)
    h_l, h_i = torch.randn(D), torch.randn(D)

    def backward():
        mods.zero_grad(set_to_none=True)
        lat, _ = mods.build_latents(h_l, h_i, 3, 2, feats, None, (3, 4), 0.1, 0.1, noise=True,
                                    generator=torch.Generator().manual_seed(0))
        (lat * torch.linspace(-1, 1, lat.numel()).view_as(lat)).sum().backward()

    backward()
    assert feats.grad is None  # the ViT features are detached (frozen tower)
    nonzero = lambda p: p.grad is not None and p.grad.abs().sum() > 0  # noqa: E731
    for name, p in mods.named_parameters():
        if name.startswith(("grid.", "latentformer.")) or name.endswith("fc2.weight"):
            assert nonzero(p), name
    assert mods.scale_head.h.weight.grad is None
    # zero-init last layer: nothing reaches fc1 yet; once fc2 is non-zero it does
    assert not nonzero(mods.mlp_l.fc1.weight)
    with torch.no_grad():
        mods.mlp_l.fc2.weight.normal_(0, 0.02)
        mods.mlp_i.fc2.weight.normal_(0, 0.02)
    backward()
    for m in (mods.mlp_l, mods.mlp_i):
        assert nonzero(m.fc1.weight) and nonzero(m.norm.weight)
    mods.scale_head.loss(torch.randn(2, D), torch.tensor([3, 4]), torch.tensor([2, 1])).backward()
    assert nonzero(mods.scale_head.h.weight) and nonzero(mods.scale_head.w.bias)


def test_stage_placement(megatron_single_rank):
    first, last = _modules(last_stage=False), _modules(first_stage=False)
    assert not any(n.startswith("scale_head") for n, _ in first.named_parameters())
    assert {n.split(".")[0] for n, _ in last.named_parameters()} == {"scale_head"}
    with pytest.raises(RuntimeError, match="first pipeline stage"):
        last.build_latents(torch.randn(D), torch.randn(D), 2, 2, torch.randn(4, D), None,
                           (2, 2), 0.1, 0.1, noise=False)


def test_no_question_features_skips_cross_attention(megatron_single_rank):
    lf = _modules().latentformer
    out = lf(torch.randn(4, D), torch.randn(0, D), latent_coords(2, 2, (2, 2)),
             torch.zeros(0, 2))
    assert out.shape == (4, D) and torch.isfinite(out).all()


def test_from_model_config_and_bf16_parameters(megatron_single_rank):
    from types import SimpleNamespace

    from megatron_latent.latent.latentformer import DeepLatentModules

    cfg = SimpleNamespace(hidden_size=D, num_attention_heads=HEADS, tensor_model_parallel_size=1,
                          params_dtype=torch.bfloat16)
    mods = DeepLatentModules.from_model_config(cfg, pre_process=True, post_process=False,
                                               mlp_hidden=16)
    assert mods.scale_head is None
    assert {p.dtype for p in mods.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        mods.mlp_l.fc2.weight.normal_(0, 0.02)
    lat, rec = mods.build_latents(torch.randn(D), torch.randn(D), 2, 2, torch.randn(6, D), None,
                                  (2, 3), 0.1, 0.1, noise=True,
                                  generator=torch.Generator().manual_seed(0))
    assert lat.dtype == torch.bfloat16 and torch.isfinite(lat).all()
    assert rec.q.stats.s2.dtype == torch.float32 and rec.q.gamma.dtype == torch.bfloat16


# ---- the dist checkpoint at TP=1 ---------------------------------------------------------------
def test_sharded_state_dict_layout(megatron_single_rank):
    from megatron.core.transformer.utils import sharded_state_dict_default

    mods = _modules()
    # the way a MegatronModule parent (Qwen25VLModel) asks its child
    sd = sharded_state_dict_default(mods, "latent_modules.")
    keys = {k for k in sd if not k.endswith("_extra_state")}
    assert keys == {f"latent_modules.{n}" for n, _ in mods.named_parameters()}
    q = sd["latent_modules.latentformer.blocks.0.self_attn.q_proj.weight"]
    o = sd["latent_modules.latentformer.blocks.0.self_attn.o_proj.weight"]
    grid = sd["latent_modules.grid.queries"]
    assert q.global_shape == (D, D) and grid.global_shape == (16, 16, D)
    assert all(t.replica_id == (0, 0, 0) for t in (q, o, grid))


def test_dist_checkpoint_round_trip_tp1(megatron_single_rank, tmp_path):
    from megatron.core import dist_checkpointing

    torch.manual_seed(6)
    saved = _modules(latentformer_layers=2, latentformer_ffn=True)
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # the zero-init and ones-init ones too
    dist_checkpointing.save(saved.sharded_state_dict(), str(tmp_path))
    torch.manual_seed(7)
    loaded = _modules(latentformer_layers=2, latentformer_ffn=True)
    state = dist_checkpointing.load(loaded.sharded_state_dict(), str(tmp_path))
    loaded.load_state_dict(state)
    want = saved.state_dict()
    for name, t in loaded.state_dict().items():
        if not name.endswith("_extra_state"):
            assert torch.equal(t, want[name]), name
    args = (torch.randn(D), torch.randn(D), 4, 3, torch.randn(12, D), None, (3, 4), 0.1, 0.1)
    assert torch.equal(saved.build_latents(*args, noise=False)[0],
                       loaded.build_latents(*args, noise=False)[0])
