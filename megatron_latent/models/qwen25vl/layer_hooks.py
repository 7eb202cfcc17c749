"""Functions of intermediate decoder-layer outputs for one forward: losses (`AuxLoss`) and
captures (latent/teacher.py).

A latent step's `layer_hooks()` maps a global 1-based decoder-layer number to `fn(h) -> h`, h
being that layer's output on this pipeline stage, [s_local, b, hidden] (the sequence-parallel
slice when SP is on: `local_range`, `select_local`). `Qwen25VLModel.forward` runs them through
`LayerHooks.use` on the layers this stage holds; numbers of other stages' layers are ignored.

A loss at a layer: `return AuxLoss.apply(h, loss)`. Forward is the identity; backward passes
h's gradient on and seeds `loss`'s backward with the main loss's scale (1 unless fp16 loss
scaling), so `loss` must already carry its weight and global normalisation (megatron-core's
MoEAuxLossAutoScaler pattern).

Full activation recompute (recompute_granularity="full"): a checkpointed chunk first runs
without grad and is re-run in backward. A hook of a layer in such a chunk is not called in the
no-grad run; it is called once, in the re-run, where its loss enters the graph. So each hook is
called exactly once per forward either way (its logs count once), and it must not change h's
values (a loss or a capture only). The re-run finds its hooks by the chunk input's storage,
which the checkpoint keeps alive until then.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import is_checkpointing
from megatron.core.utils import make_viewless_tensor

Hook = Callable[[torch.Tensor], torch.Tensor]


class AuxLoss(torch.autograd.Function):
    """out = AuxLoss.apply(h, loss): out == h; backward adds d(loss)/d(inputs of loss)."""

    loss_scale: torch.Tensor | None = None  # the main loss's scale (set per forward)

    @staticmethod
    def forward(ctx, h, loss):
        ctx.save_for_backward(loss)
        return h

    @staticmethod
    def backward(ctx, grad):
        (loss,) = ctx.saved_tensors
        seed = torch.ones_like(loss)
        if AuxLoss.loss_scale is not None:
            seed = seed * AuxLoss.loss_scale.to(seed.device, seed.dtype)
        return grad, seed


def local_range(h: torch.Tensor, seq_len: int) -> tuple[int, int]:
    """[start, stop) of the global sequence positions that `h` [s_local, ...] holds: all of
    them, or this tensor-parallel rank's contiguous slice under sequence parallelism."""
    s = h.shape[0]
    if s == seq_len:
        return 0, s
    if parallel_state.get_context_parallel_world_size() > 1:
        raise NotImplementedError("layer hooks under context parallelism")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if s * tp != seq_len:
        raise ValueError(f"layer output holds {s} positions; expected {seq_len} or {seq_len}/{tp}")
    start = parallel_state.get_tensor_model_parallel_rank() * s
    return start, start + s


def slot_positions(mask: torch.Tensor) -> torch.Tensor:
    """(row, position) [n, 2] of the True entries of `mask` [b, s], row-major (slot order),
    on the host (pass a host mask: no device sync)."""
    return mask.cpu().nonzero()


def select_local(h: torch.Tensor, slots: torch.Tensor, seq_len: int):
    """(h at the slots this rank holds [n_local, hidden], their slot indices [n_local]) for
    `h` [s_local, b, hidden] and host `slots` (slot_positions). Index work on the host."""
    start, stop = local_range(h, seq_len)
    idx = ((slots[:, 1] >= start) & (slots[:, 1] < stop)).nonzero()[:, 0]
    rows, pos = slots[idx, 0], slots[idx, 1] - start
    dev = h.device
    return (h[pos.to(dev, non_blocking=True), rows.to(dev, non_blocking=True)],
            idx.to(dev, non_blocking=True))


class LayerHooks:
    """Installed once on a TransformerBlock (its layers of this stage); `use(hooks)` activates
    a step's hooks for one forward."""

    def __init__(self, block, config):
        self.config, self.active = config, {}
        self.pending: dict[int, dict[int, Hook]] = {}  # chunk input storage -> deferred hooks
        self.chunk: dict[int, Hook] | None = None  # the checkpointed chunk running now
        self.device = next(block.parameters(), torch.empty(0)).device
        for i, layer in enumerate(block.layers):
            layer.register_forward_pre_hook(partial(self._pre, i), with_kwargs=True)
            layer.register_forward_hook(partial(self._post, layer.layer_number))

    @contextmanager
    def use(self, hooks: dict[int, Hook]):
        cfg = self.config
        bad = [n for n in hooks if not 1 <= n <= cfg.num_layers]
        if bad:
            raise ValueError(f"layer hooks at layers {bad}: the model has layers "
                             f"1..{cfg.num_layers}")
        if hooks and cfg.recompute_granularity == "full" and (
                cfg.distribute_saved_activations or cfg.fp8 or cfg.fp4):
            raise NotImplementedError("layer hooks with full recompute need "
                                      "distribute_saved_activations, fp8 and fp4 off")
        if hooks and cfg.grad_scale_func is not None and torch.is_grad_enabled():
            one = torch.ones((), device=self.device)
            AuxLoss.loss_scale = cfg.grad_scale_func(one).detach().reshape(())
        self.active = hooks
        try:
            yield
        finally:
            self.active = {}

    def _checkpointed(self) -> bool:
        """In a chunk of megatron's full recompute (its no-grad run or its re-run)."""
        return self.config.recompute_granularity == "full" and is_checkpointing()

    def _chunk_start(self, i: int) -> bool:
        cfg = self.config
        return cfg.recompute_method == "block" or i % cfg.recompute_num_layers == 0

    def _pre(self, i, module, args, kwargs):
        if not self._checkpointed() or not self._chunk_start(i):
            return None
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        key = h.data_ptr()
        if torch.is_grad_enabled():  # the re-run in backward
            self.chunk = self.pending.pop(key, None)
        else:  # the no-grad first run: a fresh entry, replacing any dead graph's one
            self.pending.pop(key, None)
            self.chunk = None
            if self.active:
                self.chunk = self.pending[key] = {}
        return None

    def _post(self, number, module, args, output):
        if self._checkpointed():
            if self.chunk is None:
                return None
            if not torch.is_grad_enabled():
                if number in self.active:
                    self.chunk[number] = self.active[number]
                return None
            fn = self.chunk.pop(number, None)
        else:
            fn = self.active.get(number)
        if fn is None:
            return None
        h, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
        h = fn(h)
        h = make_viewless_tensor(h, requires_grad=h.requires_grad, keep_graph=True)
        return h if rest is None else (h, *rest)
