"""CUDA graphs of the vision tower's forward when nothing in it needs a gradient.

A frozen 32-block tower over a few images is a few milliseconds of GPU work behind ~1,000 kernel
launches and TE's per-module Python: eager, the host sets its pace (measured on an H200: ~50 ms of
a 7B LVR SFT micro-batch with the GPU mostly idle). Replaying a captured graph removes that.

One graph per image-grid layout (the tuple of (t, h, w) per image fixes every shape and index),
captured the second time a layout is seen (data with ever-changing image sizes never pays for a
capture it would not reuse), kept in a small LRU; the graphs share one memory pool (they never run concurrently, and only
their static inputs and outputs stay alive between replays). A graph reads the weights where
they were at capture: in-place updates (optimizer steps, checkpoint loads) are seen, but a
module moved to other memory (`.cpu()`/`.to()`, as the RL reference's host offload does) drops
every graph. A capture that fails (an op that
cannot be captured) turns graphs off for the process with a warning: the eager path is exact.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

log = logging.getLogger(__name__)


class _Entry:
    def __init__(self, pixels, layout, graph, out):
        self.pixels, self.layout, self.graph, self.out = pixels, layout, graph, out


class VisionGraphs:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.pool = None
        self.disabled_reason: str | None = None
        self.captures = 0  # for tests and logs
        self.seen: OrderedDict[tuple, int] = OrderedDict()  # sightings of uncaptured layouts
        self.storage: tuple = ()  # where the weights were when the graphs were captured

    def usable(self, model: torch.nn.Module, pixel_values: torch.Tensor, key: tuple) -> bool:
        """Whether this forward should go through a graph (counts a sighting of `key`)."""
        if self.capacity <= 0 or self.disabled_reason or not pixel_values.is_cuda:
            return False
        if torch.cuda.is_current_stream_capturing():
            return False  # inside someone else's capture: just record the ops
        tensors = list(model.parameters())
        if torch.is_grad_enabled() and (pixel_values.requires_grad
                                        or any(p.requires_grad for p in tensors)):
            return False  # training the tower: autograd needs the eager graph
        storage = tuple(t.data_ptr() for t in tensors + list(model.buffers()))
        if storage != self.storage:  # moved (or first use): graphs would read stale memory
            self.entries.clear()
            self.pool = None
            self.storage = storage
        if key in self.entries:
            return True
        self.seen[key] = self.seen.pop(key, 0) + 1
        while len(self.seen) > 256:
            self.seen.popitem(last=False)
        return self.seen[key] >= 2

    def run(self, key: tuple, fn, pixel_values: torch.Tensor, dtype: torch.dtype,
            make_layout) -> torch.Tensor:
        """fn(pixels in `dtype`, layout) -> features, replayed from the graph of `key` (captured
        on the first call). Returns a fresh tensor (the graph's output buffer is reused)."""
        entry = self.entries.get(key)
        if entry is None or entry.pixels.shape != pixel_values.shape:
            try:
                entry = self._capture(key, fn, pixel_values.to(dtype, copy=True), make_layout)
            except RuntimeError as e:  # e.g. an op that cannot be captured: stay eager
                self.disabled_reason = str(e).splitlines()[0]
                log.warning("vision tower CUDA graphs turned off: %s", self.disabled_reason)
                return fn(pixel_values.to(dtype), make_layout())
        self.entries.move_to_end(key)
        entry.pixels.copy_(pixel_values)
        entry.graph.replay()
        return entry.out.clone()

    def _capture(self, key, fn, pixels, make_layout) -> _Entry:
        layout = make_layout()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            fn(pixels, layout)  # lazy init (cuBLAS/cuDNN plans, torch.compile) outside capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            out = fn(pixels, layout)
        if self.pool is None:
            self.pool = graph.pool()
        entry = _Entry(pixels, layout, graph, out)
        self.entries[key] = entry
        self.seen.pop(key, None)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        self.captures += 1
        return entry
