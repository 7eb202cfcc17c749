"""CUDA graphs of the vision tower's forward when nothing in it needs a gradient.

A frozen 32-block tower over a few images is a few milliseconds of GPU work behind ~1,000 kernel
launches and TE's per-module Python: eager, the host sets its pace (measured on an H200: ~50 ms of
a 7B LVR SFT micro-batch with the GPU mostly idle). Replaying a captured graph removes that.

One graph per image-grid layout (the tuple of (t, h, w) per image fixes every shape and index),
captured the second time a layout is seen (data whose image sizes never repeat never pays for a
capture), kept in a small LRU. The graphs share one memory pool: they never run concurrently,
and only their static inputs and outputs stay alive between replays. A graph reads the weights
where they were at capture: in-place updates (optimizer steps, checkpoint loads) are seen; a move
to other memory (`.cpu()`/`.to()`, as the RL reference's host offload does) drops every graph.
A failed capture (agreed over the tensor-parallel group) or layouts that change too often for
graphs to be reused turn graphs off for the process with a warning: the eager path is exact.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from megatron_latent.platform import graph_registry

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
        self.captures = self.replays = 0  # for tests, logs and the thrash check
        self.seen: OrderedDict[tuple, int] = OrderedDict()  # sightings of uncaptured layouts
        self.storage: tuple = ()  # where the weights were when the graphs were captured
        self.param_dicts: list | None = None  # the tower's modules' own dicts, on first use
        self.buffer_dicts: list = []
        graph_registry.register(self)

    def drop_graphs(self) -> None:  # teardown (parallel.destroy): captured again when next used
        self.reset()

    def usable(self, model: torch.nn.Module, pixel_values: torch.Tensor, key: tuple) -> bool:
        """Whether this forward should go through a graph (counts a sighting of `key`)."""
        if self.capacity <= 0 or self.disabled_reason or not pixel_values.is_cuda:
            return False
        if torch.cuda.is_current_stream_capturing():
            return False  # inside someone else's capture: just record the ops
        # the modules are fixed after construction; walking their own parameter and buffer
        # dicts (not parameters(), whose generators cost milliseconds of host time per call on
        # a 32-block tower) still sees a parameter replaced in place, e.g.
        # load_state_dict(assign=True). The dicts, not the modules, are kept: no cycle
        if self.param_dicts is None:
            self.param_dicts = [m._parameters for m in model.modules()]
            self.buffer_dicts = [m._buffers for m in model.modules()]
        params = [p for d in self.param_dicts for p in d.values() if p is not None]
        if torch.is_grad_enabled() and (pixel_values.requires_grad
                                        or any(p.requires_grad for p in params)):
            return False  # training the tower: autograd needs the eager graph
        buffers = [b for d in self.buffer_dicts for b in d.values() if b is not None]
        return self.decide(key, tuple(t.data_ptr() for t in params + buffers))

    def decide(self, key: tuple, storage: tuple) -> bool:
        """The caching policy (no CUDA): replay a captured layout; capture one on its second
        sighting; forget every graph when the weights' storage moved."""
        if storage != self.storage:  # moved (or first use): graphs would read stale memory
            self.reset()
            self.storage = storage
        if key in self.entries:  # a replay
            self.entries.move_to_end(key)  # most recently used
            self.replays += 1
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
        if entry is None:  # the layout fixes every shape, pixels included
            entry, error = self._try_capture(key, fn, pixel_values.to(dtype, copy=True),
                                             make_layout)
            if entry is None:  # an op that cannot be captured, say: eager from now on
                self.turn_off(error)
                return fn(pixel_values.to(dtype), make_layout())
        entry.pixels.copy_(pixel_values)
        entry.graph.replay()
        return entry.out.clone()

    def reset(self) -> None:
        """Drop every graph (the weights are about to move: `Module._apply`)."""
        self.entries.clear()
        self.pool = None
        self.storage = ()

    def turn_off(self, reason: str) -> None:
        self.reset()
        self.disabled_reason = reason
        log.warning("vision tower CUDA graphs turned off: %s", reason)

    def _try_capture(self, key, fn, pixels, make_layout):
        """(entry, None) or (None, why). Every tensor-parallel rank sees the same images and
        so the same layouts; the outcome is agreed over the TP group so that no rank replays
        collectives its peers run eagerly."""
        stream = torch.cuda.current_stream()
        entry, error = None, None
        try:
            entry = self._capture(key, fn, pixels, make_layout)
        except Exception as e:  # noqa: BLE001 - any failure means: stay eager
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            torch.cuda.set_stream(stream)  # a failed capture can leave its side stream current
        if _all_ranks_ok(error is None):
            return entry, None
        self.entries.pop(key, None)
        return None, error or "the capture failed on another tensor-parallel rank"

    def _capture(self, key, fn, pixels, make_layout) -> _Entry:
        layout = make_layout()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            fn(pixels, layout)  # lazy init (cuBLAS/cuDNN plans, torch.compile) outside capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local, as megatron's own graphs: CUDA calls of other threads (NCCL's watchdog,
        # the sample prefetcher) during the capture are not errors
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool,
                                               capture_error_mode="thread_local"):
            out = fn(pixels, layout)
        if self.pool is None:
            self.pool = graph.pool()
        entry = _Entry(pixels, layout, graph, out)
        self.admit(key, entry)
        return entry

    def admit(self, key: tuple, entry) -> None:
        """Keep a new graph (LRU of `capacity`); turn graphs off when layouts change so often
        that graphs are evicted before they are reused (a capture costs more than an eager
        forward)."""
        self.entries[key] = entry
        self.seen.pop(key, None)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        self.captures += 1
        if self.captures > 4 * self.capacity and self.replays < 2 * self.captures:
            self.turn_off(f"image layouts change too often ({self.captures} captures, "
                          f"{self.replays} replays); raise vision_graphs or bucket image sizes")


def _all_ranks_ok(ok: bool) -> bool:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()
            and ps.get_tensor_model_parallel_world_size() > 1):
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device="cuda")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=ps.get_tensor_model_parallel_group())
    return bool(flag.item())
