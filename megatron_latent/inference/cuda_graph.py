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
