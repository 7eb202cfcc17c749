"""bench_grpo_step.py's synthetic language and its train/rollout mismatch statistics."""

from __future__ import annotations

import torch


class MarkovText:
    """A random sparse Markov chain over tokens [0, vocab): each token has `fanout` successors
    with Dirichlet(1) probabilities. A few hundred SFT steps learn it, so rollouts come from a
    peaked, trained-like policy instead of a random model's near-uniform one."""

    def __init__(self, vocab: int, fanout: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.fanout = vocab, fanout
        self.succ = torch.randint(0, vocab, (vocab, fanout), generator=g)
        e = -torch.rand(vocab, fanout, generator=g).clamp_min(1e-12).log()  # Exp(1) -> Dirichlet
        self.prob = e / e.sum(1, keepdim=True)
        self._cum = self.prob.cumsum(1)

    def __call__(self, g: torch.Generator, n: int) -> torch.Tensor:
        """n tokens of one trajectory from a uniformly drawn start."""
        u = torch.rand(n, generator=g)
        out = torch.empty(n, dtype=torch.long)
        s = int(torch.randint(0, self.vocab, (1,), generator=g))
        for i in range(n):
            out[i] = s
            j = min(int(torch.searchsorted(self._cum[s], u[i])), self.fanout - 1)
            s = int(self.succ[s, j])
        return out

    def entropy_rate(self, iters: int = 200) -> float:
        """sum_s pi(s) H(next | s) in nats, pi the stationary distribution (power iteration)."""
        pi = torch.full((self.vocab,), 1.0 / self.vocab, dtype=torch.float64)
        p = self.prob.double()
        for _ in range(iters):
            pi = torch.zeros_like(pi).index_add_(0, self.succ.flatten(),
                                                 (pi[:, None] * p).flatten())
        h = -(p * p.log()).sum(1)
        return float((pi * h).sum())

    def __str__(self) -> str:
        return (f"Markov chain over {self.vocab} tokens, {self.fanout} successors each, "
                f"entropy rate {self.entropy_rate():.3f} nats")


def mismatch(scored: list, mbs: list[dict], cap: float, eps: float = 0.2) -> dict:
    """d = log p_train - log p_rollout of the sampled text tokens: mean and max |d|, the k3
    estimate of KL(rollout || train) (e^d - 1 - d on the rollout's samples), the share of
    tokens whose ratio alone is outside [1 - eps, 1 + eps], the TIS weights min(e^d, cap)
    (mean, share at the cap), and the rollout's mean negative log-prob of its own samples."""
    d, nll = [], []
    for lp, mb in zip(scored, mbs):
        m = mb["loss_mask"].bool()
        d.append(lp.float().cpu()[m] - mb["rollout_logprobs"][m])
        nll.append(-mb["rollout_logprobs"][m])
    d, nll = torch.cat(d).double(), torch.cat(nll).double()
    r = d.exp()
    w = r.clamp(max=cap)
    return {"tokens": float(d.numel()), "gap": float(d.abs().mean()),
            "gap_max": float(d.abs().max()), "kl": float((r - 1 - d).mean()),
            "share_outside_clip": float(((r < 1 - eps) | (r > 1 + eps)).double().mean()),
            "tis_mean": float(w.mean()), "tis_at_cap": float((r >= cap).double().mean()),
            "rollout_nll": float(nll.mean())}
