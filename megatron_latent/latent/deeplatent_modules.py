"""DeepLatent's small side modules and its Gaussian modulation (spec sections 2.5 and 2.9).

Everything here is plain torch, replicated on tensor-parallel ranks (its inputs are identical on
every TP rank, so its gradients are too and need no TP reduction). The TP-sharded LatentFormer
and the per-stage container are in latent/latentformer.py.

- `LatentGrid`: the learnable 16 x 16 x d query grid, bilinearly resized to a block's H x W.
- `ScaleHead`: two categorical heads on the final-norm h_s: p(H = k + 1), p(W = k + 1).
- `ModulationMLP`: h_m -> (gamma, beta), last layer zero-initialised (identity modulation).
- `modulate`: a = (1 + gamma) * X + beta + sigma * eps, with what RL needs recorded
  (`Modulation`: gamma, beta, sigma and the sufficient statistics `GaussianStats`).
- `gaussian_log_ratio_from_stats`, `gaussian_kl_from_stats`: log pi_theta(a) - log pi_old(a)
  and KL(pi_theta || pi_ref) of those actions from the statistics alone (no X, no eps).
- `latent_coords`, `grid_coords`: the real-valued 2-D RoPE positions of latent cells and of
  image cells in the image's merged grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class LatentGrid(nn.Module):
    """Q [size, size, d], init N(0, 0.02^2); `resized(H, W)` -> [H*W, d] row-major."""

    def __init__(self, dim: int, size: int = 16, dtype: torch.dtype | None = None):
        super().__init__()
        self.size = size
        self.queries = nn.Parameter(torch.randn(size, size, dim, dtype=dtype) * 0.02)

    def resized(self, height: int, width: int) -> torch.Tensor:
        if not (1 <= height <= self.size and 1 <= width <= self.size):
            raise ValueError(f"latent grid {height}x{width} outside 1..{self.size}")
        q = self.queries.permute(2, 0, 1).unsqueeze(0)  # [1, d, size, size]
        # antialias off: only downsampling from 16, and the paper's "spatially resized" with
        # torch defaults; same size is then exactly the identity (spec oracle 13)
        q = F.interpolate(q, size=(height, width), mode="bilinear", align_corners=False,
                          antialias=False)
        return q[0].flatten(1).t()  # [H*W, d], row-major


class ScaleHead(nn.Module):
    """h_s (final-norm) -> logits over H - 1 and W - 1 (classes 0..max_size-1)."""

    def __init__(self, dim: int, max_size: int = 16, dtype: torch.dtype | None = None):
        super().__init__()
        self.h = nn.Linear(dim, max_size, dtype=dtype)
        self.w = nn.Linear(dim, max_size, dtype=dtype)

    def forward(self, h_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h_s = h_s.to(self.h.weight.dtype)
        return self.h(h_s), self.w(h_s)

    def loss(self, h_s: torch.Tensor, height, width, reduction: str = "sum") -> torch.Tensor:
        """CE(H) + CE(W) per block [n] (`reduction` "none"), or their "sum" / "mean" over
        blocks. h_s [n, d] (or [d]); height, width: ints or [n] tensors of sizes 1..max."""
        lh, lw = self(h_s.reshape(-1, h_s.shape[-1]))
        targets = [torch.as_tensor(t, device=lh.device).reshape(-1) - 1 for t in (height, width)]
        per_block = (F.cross_entropy(lh.float(), targets[0].expand(lh.shape[0]), reduction="none")
                     + F.cross_entropy(lw.float(), targets[1].expand(lw.shape[0]),
                                       reduction="none"))
        if reduction == "none":
            return per_block
        return per_block.sum() if reduction == "sum" else per_block.mean()

    @torch.no_grad()
    def predict(self, h_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference: the argmax sizes (H, W), each >= 1."""
        lh, lw = self(h_s)
        return lh.argmax(-1) + 1, lw.argmax(-1) + 1


class ModulationMLP(nn.Module):
    """RMSNorm(d) -> Linear(d, hidden) -> SiLU -> Linear(hidden, 2d) -> (gamma, beta).

    The last layer starts at zero, so the modulation starts as the identity (the adaLN-Zero
    argument: the pretrained path is undisturbed at the start of stage 2)."""

    def __init__(self, dim: int, hidden: int = 1024, dtype: torch.dtype | None = None):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6, dtype=dtype)
        self.fc1 = nn.Linear(dim, hidden, dtype=dtype)
        self.fc2 = nn.Linear(hidden, 2 * dim, dtype=dtype)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = h.to(self.fc1.weight.dtype)
        gamma, beta = self.fc2(F.silu(self.fc1(self.norm(h)))).chunk(2, dim=-1)
        return gamma, beta


# ---- the Gaussian modulation action and its sufficient statistics ----------------------------
def _wide(t: torch.Tensor) -> torch.Tensor:
    """fp32 at least (bf16 states and sums of many squares), fp64 kept (exactness checks)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@dataclass
class GaussianStats:
    """Per-channel sums over the N rows of a base X [N, C] and its noise eps [N, C] (fp32):
    all RL needs of one modulation action to get its log-ratio and KL (spec 2.9).
    Fields may carry leading batch dims ([..., C] and n [...]) when stacked by a caller."""

    s1: torch.Tensor  # sum_n X
    s2: torch.Tensor  # sum_n X^2
    xe: torch.Tensor  # sum_n X * eps
    e1: torch.Tensor  # sum_n eps
    n: torch.Tensor | int  # N

    @classmethod
    def of(cls, x: torch.Tensor, eps: torch.Tensor | None) -> "GaussianStats":
        x = _wide(x.detach())
        if eps is None:  # no noise: XE = E1 = 0
            xe, e1 = x.new_zeros(x.shape[-1]), x.new_zeros(x.shape[-1])
        else:
            eps = _wide(eps.detach())
            xe, e1 = (x * eps).sum(0), eps.sum(0)
        return cls(s1=x.sum(0), s2=(x * x).sum(0), xe=xe, e1=e1, n=x.shape[0])


@dataclass
class Modulation:
    """One modulation of one block: action a = (1 + gamma) * X + beta + sigma * eps.
    gamma, beta [d] are detached copies (the rollout's "old" policy); `stats` always (KL needs
    S1, S2 and N even without noise); `action` [N, d] only when asked for (it can be large)."""

    gamma: torch.Tensor
    beta: torch.Tensor
    sigma: float
    noisy: bool
    stats: GaussianStats
    action: torch.Tensor | None = None

    def row(self, i: int) -> "Modulation":
        """Row i of a modulation of r rows at once (x [N, r, d], gamma [r, d])."""
        s = self.stats
        return Modulation(self.gamma[i], self.beta[i], self.sigma, self.noisy,
                          GaussianStats(s.s1[i], s.s2[i], s.xe[i], s.e1[i], s.n),
                          None if self.action is None else self.action[:, i])


def modulate(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, sigma: float, *,
             noise: bool, generator: torch.Generator | None = None,
             eps: torch.Tensor | None = None, keep_action: bool = False
             ) -> tuple[torch.Tensor, Modulation]:
    """(1 + gamma) * x + beta (+ sigma * eps when `noise`) and its `Modulation` record.

    x [N, d]; gamma, beta [d], broadcast over rows. eps ~ N(0, I) is drawn in fp32 from
    `generator` (on x's device; the default generator if None: then every TP rank must draw the
    same numbers, which holds when they run the same code from the same seed), unless given
    (tests, replay). Statistics are kept in fp32 (fp64 for fp64 inputs).
    Gradients flow to x, gamma and beta (SFT trains the grid and the MLPs through this)."""
    out = (1 + gamma) * x + beta
    if noise:
        if eps is None:
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        out = out + (sigma * eps).to(out.dtype)
    else:
        eps = None
    record = Modulation(gamma=gamma.detach(), beta=beta.detach(), sigma=float(sigma),
                        noisy=noise, stats=GaussianStats.of(x, eps),
                        action=out.detach() if keep_action else None)
    return out, record


def gaussian_log_ratio_from_stats(gamma, beta, gamma_old, beta_old, stats: GaussianStats,
                                  sigma: float) -> torch.Tensor:
    """log pi_theta(a) - log pi_old(a), summed over all N x C dims, for a = mu_old + sigma*eps,
    mu = (1 + gamma) X + beta. With d_gamma = gamma_old - gamma, d_beta = beta_old - beta:
      |a - mu_theta|^2 - |a - mu_old|^2
        = sum_c [d_gamma^2 S2 + 2 d_gamma d_beta S1 + N d_beta^2 + 2 sigma (d_gamma XE + d_beta E1)]
    and log ratio = -(that) / (2 sigma^2). Only differences of gamma enter, so the (1 + gamma)
    parametrisation and a directly multiplying gamma give the same value. [..., C] -> [...];
    the gradient flows to gamma, beta (theta)."""
    dg = _wide(gamma_old) - _wide(gamma)
    db = _wide(beta_old) - _wide(beta)
    n = torch.as_tensor(stats.n, device=dg.device, dtype=dg.dtype).unsqueeze(-1)
    quad = (dg * dg * stats.s2 + 2 * dg * db * stats.s1 + n * db * db
            + 2 * sigma * (dg * stats.xe + db * stats.e1))
    return -quad.sum(-1) / (2 * sigma * sigma)


def gaussian_kl_from_stats(gamma, beta, gamma_ref, beta_ref, stats: GaussianStats,
                           sigma: float) -> torch.Tensor:
    """KL(pi_theta || pi_ref) = |mu_theta - mu_ref|^2 / (2 sigma^2) (one fixed sigma), from the
    base statistics: sum_c [d^2 S2 + 2 d_gamma d_beta S1 + N d_beta^2] / (2 sigma^2) with
    d = theta - ref. Noise-free: XE and E1 are not used. [..., C] -> [...]."""
    dg = _wide(gamma) - _wide(gamma_ref)
    db = _wide(beta) - _wide(beta_ref)
    n = torch.as_tensor(stats.n, device=dg.device, dtype=dg.dtype).unsqueeze(-1)
    quad = dg * dg * stats.s2 + 2 * dg * db * stats.s1 + n * db * db
    return quad.sum(-1) / (2 * sigma * sigma)


def gaussian_log_prob(a: torch.Tensor, mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(a; mu, sigma^2 I) summed over all dims (the direct form the statistics replace)."""
    z = (_wide(a) - _wide(mu)) / sigma
    return -(0.5 * z * z + math.log(sigma) + 0.5 * math.log(2 * math.pi)).sum()


# ---- 2-D RoPE coordinates -----------------------------------------------------------------------
def grid_coords(height: int, width: int, device=None) -> torch.Tensor:
    """(row, col) of each cell of a height x width grid, row-major: [height*width, 2] fp32."""
    r = torch.arange(height, device=device, dtype=torch.float32)
    c = torch.arange(width, device=device, dtype=torch.float32)
    return torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(-1, 2)


def latent_coords(height: int, width: int, image_grid: tuple[int, int], device=None
                  ) -> torch.Tensor:
    """Cell (i, j) of an H x W latent grid laid over an image of merged size (h_I, w_I) sits at
    r = (i + 1/2) h_I / H - 1/2, c = (j + 1/2) w_I / W - 1/2 (cell centres, in image-cell units):
    self- and cross-attention then see geometrically meaningful relative positions between
    latents and image cells. [H*W, 2] fp32, row-major."""
    h_img, w_img = image_grid
    scale = torch.tensor([h_img / height, w_img / width], device=device)
    return (grid_coords(height, width, device) + 0.5) * scale - 0.5
