"""The decode iteration as one CUDA graph: at small batch a decode step is a few milliseconds of
GPU work but hundreds of kernel launches, plus sampling, the latent rule and the records between
forwards; replaying one captured graph removes the launches and the host work between them.

Captured once per decode loop (batch shape and sampling settings) on its first iteration. The
warm-up and the capture run the iteration for real, so every tensor it mutates is saved before
and restored after (the KV cache's slot that they write is written again by the first replay),
as is the sampling generator's state (registered with the graph, so replays advance it).
"""

from __future__ import annotations

import torch

from megatron_latent.platform import graph_registry


class GraphedIteration:
    def __init__(self, step, state: list[torch.Tensor], generator: torch.Generator | None = None):
        self.step, self.state, self.generator = step, state, generator
        self.graph = None
        graph_registry.register(self)

    def drop_graphs(self) -> None:
        self.graph = None  # captured again on the next call

    def _capture(self) -> None:
        saved = [t.clone() for t in self.state]
        rng = self.generator.get_state() if self.generator is not None else None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy init (cuBLAS handles, Triton and compiled kernels) first
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            self.graph.register_generator_state(self.generator)
        # thread_local, as megatron's own graphs: CUDA calls of other threads (NCCL's watchdog,
        # data loading) during the capture are not errors
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.step()
        for t, s in zip(self.state, saved):
            t.copy_(s)
        if rng is not None:
            self.generator.set_state(rng)

    def __call__(self) -> None:
        if self.graph is None:
            self._capture()
        self.graph.replay()


class ChunkGraph:
    """A chunk append's forward (generator.py `_chunk_body`) as one CUDA graph of a fixed shape
    [b, kp]: static inputs (ids, valid, feed, vectors, positions), the last `kp - k` slots of a
    shorter block padded (pad id, not valid, after every real input: no real query sees them).
    Captured on first use, at the cache's current write index (a device scalar: replays follow
    it). The warm-up and the capture run the forward for real: the cache's `valid` is saved
    and restored around them, and the KV slots they write are written again by the replay
    that follows; the caller advances the cache."""

    def __init__(self, gen, cache, b: int, kp: int, hidden: int, dtype, pad_id: int):
        self.gen, self.cache, self.kp, self.pad_id = gen, cache, kp, pad_id
        dev = cache.device
        self.ids = torch.full((b, kp), pad_id, dtype=torch.long, device=dev)
        self.valid = torch.zeros(b, kp, dtype=torch.bool, device=dev)
        self.feed = torch.zeros(b, kp, dtype=torch.bool, device=dev)
        self.vectors = torch.zeros(b, kp, hidden, dtype=dtype, device=dev)
        self.positions = torch.zeros(3, b, kp, dtype=torch.long, device=dev)
        self.out = None
        self.graph = None
        graph_registry.register(self)

    def drop_graphs(self) -> None:
        self.graph = None

    def _run(self):
        return self.gen._chunk_body(self.cache, self.ids, self.valid, self.feed, self.vectors,
                                    self.positions)

    def _capture(self) -> None:
        valid = self.cache.valid.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.out = self._run()
        self.cache.valid.copy_(valid)
        self.graph = graph

    def __call__(self, ids, valid, feed, vectors, positions) -> torch.Tensor:
        """-> hidden [b, kp, h] (a static buffer: read before the next call)."""
        k = ids.shape[1]
        self.ids[:, :k].copy_(ids)
        self.ids[:, k:].fill_(self.pad_id)
        self.valid[:, :k].copy_(valid)
        self.valid[:, k:].zero_()
        self.feed[:, :k].copy_(feed)
        self.feed[:, k:].zero_()
        self.vectors[:, :k].copy_(vectors)
        self.vectors[:, k:].zero_()
        self.positions[..., :k].copy_(positions)
        if k < self.kp:  # after the block's last position: never before a real input
            self.positions[..., k:] = (positions.amax(-1, keepdim=True)
                                       + torch.arange(1, self.kp - k + 1, device=ids.device))
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.out.transpose(0, 1)
