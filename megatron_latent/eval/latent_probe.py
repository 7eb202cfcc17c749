"""Latent probes, the measures: do a method's latents carry information? (tools/latent_probe.py)

Pure functions on tensors (float32 on the host, whatever they came from):
- `homogeneity`: the mean pairwise cosine of the latents within each span, and between latents
  of different samples (1.0: one vector everywhere; a span that says nothing about its image
  tends to 1.0 on both);
- `grounding`: for spans with a visual target (LVR: the box's visual tokens; HyLaR: the canvas),
  the cosine of each span (its latents pooled by the mean) to its own target vs to the other
  candidates, and the top-1 retrieval of the own target among them: other regions of the same
  image (`tile_regions`) or the other spans of the evaluation set;
- `mean_norm`: the scale of fed latents, targets and ordinary token embeddings.
The ablation decode programs are in probe_programs.py, the runner in probe_runner.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1, eps=1e-12)


def homogeneity(spans: list[torch.Tensor], samples: list[int] | None = None) -> dict:
    """`spans`: [n_i, h] latents of each span; `samples`: the sample of each span (default: one
    sample per span). -> {"within_span": mean over spans of >= 2 latents of their mean pairwise
    cosine (i < j), "across_samples": mean cosine over all pairs of latents of different
    samples}; None where there is no pair."""
    samples = list(range(len(spans))) if samples is None else samples
    within = []
    for s in spans:
        n = s.shape[0]
        if n >= 2:
            u = _unit(s)
            # sum over ordered pairs i != j of u_i . u_j = |sum u|^2 - n
            within.append(((u.sum(0).pow(2).sum() - n) / (n * (n - 1))).item())
    by_sample: dict[int, list[torch.Tensor]] = {}
    for s, k in zip(spans, samples):
        if s.shape[0]:
            by_sample.setdefault(k, []).append(_unit(s))
    sums = [torch.cat(v).sum(0) for v in by_sample.values()]
    counts = [sum(x.shape[0] for x in v) for v in by_sample.values()]
    pairs = sum(counts) ** 2 - sum(c * c for c in counts)  # ordered pairs of different samples
    across = None
    if pairs:
        total = torch.stack(sums).sum(0).pow(2).sum() - sum(x.pow(2).sum() for x in sums)
        across = (total / pairs).item()
    return {"within_span": sum(within) / len(within) if within else None,
            "across_samples": across}


def retrieval(queries: torch.Tensor, candidates: list[torch.Tensor], own: list[int]) -> dict:
    """Query i [h] against its candidates [k_i, h], its own target at index own[i] ->
    {"top1": fraction whose most cosine-similar candidate is the own one (ties count as a miss
    unless the own one comes first), "cos_own", "cos_other": mean cosine to the own candidate /
    to the others, "chance": mean 1 / k_i, "n"}."""
    hits, cos_own, cos_other, chance = [], [], [], []
    for q, cand, k in zip(queries, candidates, own):
        c = _unit(cand) @ _unit(q)
        hits.append(float(int(c.argmax()) == k))
        cos_own.append(c[k].item())
        others = torch.cat([c[:k], c[k + 1:]])
        if others.numel():
            cos_other.append(others.mean().item())
        chance.append(1.0 / cand.shape[0])
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    return {"top1": mean(hits), "cos_own": mean(cos_own), "cos_other": mean(cos_other),
            "chance": mean(chance), "n": len(hits)}


def slot_cosine(latents: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Mean cosine of latent i to target i ([n, h] each)."""
    if not latents.shape[0]:
        return None
    return (_unit(latents) * _unit(targets)).sum(-1).mean().item()


def mean_norm(vectors: torch.Tensor) -> float | None:
    """Mean L2 norm of the rows of [n, h]."""
    return vectors.float().norm(dim=-1).mean().item() if vectors.shape[0] else None


def grounding(generated: list[list[torch.Tensor]], teacher_forced: list[list[dict]]) -> dict | None:
    """Grounding of each span, its latents pooled by the mean. `teacher_forced[i]`: item i's
    spans, each {"pred" [n, h]: the hidden states before its slots, "target" [n, h] | None,
    "region": (candidate regions [k, h], own index) | None}; `generated[i]`: the latents [n, h]
    of item i's spans as generated (its m-th span goes with its m-th target). -> None when no
    span has a target, else per kind of latents ("teacher_forced", "generated", and
    "targets": the targets as their own latents, the measures' ceiling) {"samples": retrieval
    among the pooled targets of every span, "regions": retrieval among the regions of its own
    image (None without regions)}; "teacher_forced" also has "slot_cos_own" (`slot_cosine`)."""
    spans = [(i, m, s) for i, item in enumerate(teacher_forced) for m, s in enumerate(item)
             if s["target"] is not None]
    if not spans:
        return None
    pooled = torch.stack([s["target"].float().mean(0) for _, _, s in spans])
    key = {(i, m): k for k, (i, m, _) in enumerate(spans)}

    def measure(queries: list[tuple[int, torch.Tensor]]) -> dict | None:
        if not queries:
            return None
        ks = [k for k, _ in queries]
        out = {"samples": retrieval(torch.stack([q for _, q in queries]), [pooled] * len(ks), ks),
               "regions": None}
        regioned = [(q, spans[k][2]["region"]) for k, q in queries
                    if spans[k][2]["region"] is not None]
        if regioned:
            out["regions"] = retrieval(torch.stack([q for q, _ in regioned]),
                                       [r[0] for _, r in regioned], [r[1] for _, r in regioned])
        return out

    tf = measure([(k, s["pred"].float().mean(0)) for k, (_, _, s) in enumerate(spans)])
    tf["slot_cos_own"] = slot_cosine(torch.cat([s["pred"] for _, _, s in spans]),
                                     torch.cat([s["target"] for _, _, s in spans]))
    gen = [(key[(i, m)], x.float().mean(0)) for i, item in enumerate(generated)
           for m, x in enumerate(item) if (i, m) in key and x.shape[0]]
    return {"teacher_forced": tf, "generated": measure(gen),
            "targets": measure([(k, s["target"].float().mean(0))
                                for k, (_, _, s) in enumerate(spans)])}


def spans(mask: torch.Tensor) -> list[tuple[int, int, int]]:
    """[b, s] bool -> (row, start, length) of each run of True, row-major."""
    out = []
    for r, row in enumerate(mask.bool().tolist()):
        j = 0
        while j < len(row):
            if row[j]:
                k = j
                while k < len(row) and row[k]:
                    k += 1
                out.append((r, j, k - j))
                j = k
            else:
                j += 1
    return out


def tile_regions(features: torch.Tensor, grid_hw: tuple[int, int],
                 index: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Candidate regions for a box of one image: `features` [h2 * w2, d] its merged visual
    tokens (row-major grid h2 x w2), `index` the box's token indices (a rectangle, as LVR's
    data takes them). The image is tiled with rectangles of the box's size anchored at the box
    (those that fit); -> (their mean features [k, d], the box's own tile index)."""
    h2, w2 = grid_hw
    rows, cols = index // w2, index % w2
    r0, c0 = int(rows.min()), int(cols.min())
    bh, bw = int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1
    if bh * bw != index.numel():
        raise ValueError(f"box indices {index.tolist()} are not a rectangle of the {h2}x{w2} grid")
    grid = features.reshape(h2, w2, -1)
    tiles, own = [], 0
    for r in range(r0 % bh, h2 - bh + 1, bh):
        for c in range(c0 % bw, w2 - bw + 1, bw):
            if (r, c) == (r0, c0):
                own = len(tiles)
            tiles.append(grid[r:r + bh, c:c + bw].reshape(bh * bw, -1).float().mean(0))
    return torch.stack(tiles), own


def box_regions(latent_mask: torch.Tensor, latent_index: torch.Tensor,
                image_features: torch.Tensor, image_grid_thw: torch.Tensor,
                spatial_merge_size: int) -> list[tuple[torch.Tensor, int]]:
    """`tile_regions` for each latent span of a micro-batch whose targets are merged visual
    tokens of its images (`latent_index`: the row-major latent slots' rows of the batch's
    concatenated `image_features`; one span's indices lie in one image)."""
    merged = [(int(t) * int(h) * int(w)) // spatial_merge_size ** 2
              for t, h, w in image_grid_thw.tolist()]
    starts = torch.tensor([0] + merged).cumsum(0)
    index = latent_index.cpu()
    out, at = [], 0
    for _, _, n in spans(latent_mask):
        idx = index[at:at + n]
        at += n
        k = int(torch.searchsorted(starts, idx[0], right=True)) - 1
        t, h, w = image_grid_thw[k].tolist()
        if t != 1:
            raise ValueError("box regions need single-frame images")
        lo = int(starts[k])
        feats = image_features[lo:lo + merged[k]]
        out.append(tile_regions(feats, (h // spatial_merge_size, w // spatial_merge_size),
                                idx - lo))
    return out
