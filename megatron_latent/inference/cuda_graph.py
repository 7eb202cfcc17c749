"""The decode step as one CUDA graph: at small batch a decode step is a few milliseconds of GPU
work but hundreds of kernel launches; replaying a captured graph removes the launch overhead.

Captured once per (batch, cache length) on the first call, with the cache's write position and
validity restored afterwards (warm-up and capture run the step but must not advance it).
"""

from __future__ import annotations

import torch


class GraphedDecode:
    def __init__(self, step, cache, batch: int, hidden: int, device, dtype):
        self.step, self.cache = step, cache
        self.ids = torch.zeros(batch, dtype=torch.long, device=device)
        self.feed = torch.zeros(batch, dtype=torch.bool, device=device)
        self.latent = torch.zeros(batch, hidden, dtype=dtype, device=device)
        self.positions = torch.zeros(3, batch, 1, dtype=torch.long, device=device)
        self.graph = None
        self.out = None

    def _load(self, ids, feed, latent, positions) -> None:
        self.ids.copy_(ids)
        self.feed.copy_(feed)
        self.latent.copy_(latent)
        self.positions.copy_(positions)

    def _capture(self) -> None:
        cache = self.cache
        saved = cache.write_index.clone(), cache.valid.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy init (cuBLAS handles, workspaces) outside the capture
                self.step(self.ids, self.feed, self.latent, self.positions)
                cache.write_index.copy_(saved[0])
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.step(self.ids, self.feed, self.latent, self.positions)
        cache.write_index.copy_(saved[0])
        cache.valid.copy_(saved[1])

    def __call__(self, ids, feed, latent, positions):
        self._load(ids, feed, latent, positions)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.out
