"""The few places where megatron-core 0.19 assumes CUDA, patched so it runs on CPU with gloo.

Used only when no GPU is present (CI, laptops); on a CUDA machine `install()` is a no-op and
stock megatron-core runs. Every patch below names the megatron-core site it exists for.

- `torch.cuda.current_device()` is used as a device in ~80 places (rotary embeddings, the global
  memory buffer of the local attention, utils): it returns "cpu".
- The RNG tracker (tensor_parallel/random.py) keeps CUDA generator states: a tracker over CPU
  generator states replaces it, so per-rank dropout/init streams still differ as on GPU.
- Literal `device="cuda"`, `.cuda()` and `torch.cuda.FloatTensor` type checks in the pipeline
  schedules, optimizer and grad clipping: a TorchFunctionMode maps them to CPU.
- `torch.cuda.synchronize`, `torch.cuda.current_stream` (p2p, async checkpoint, DDP buckets):
  no-ops / a dummy stream.
- The torch RMSNorm refuses sequence parallel (transformer/torch_norm.py): a subclass without the
  assert that tags its weight `sequence_parallel=True`, as the fused norms do. This one is also
  applied on GPUs (by `megatron_latent.parallel.initialize`), for the local spec.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


class _CudaToCpuMode(TorchFunctionMode):
    """Maps `device="cuda"` / `.cuda()` / `.to("cuda")` to CPU and reports CPU float tensors'
    `.type()` as the CUDA type that megatron-core's optimizer and clip_grads check for."""

    _TYPE_NAMES = {
        "torch.FloatTensor": "torch.cuda.FloatTensor",
        "torch.HalfTensor": "torch.cuda.HalfTensor",
        "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    }

    @staticmethod
    def _is_cuda(dev) -> bool:
        if isinstance(dev, torch.device):
            return dev.type == "cuda"
        if isinstance(dev, str):
            return dev.startswith("cuda")
        return isinstance(dev, int) and not isinstance(dev, bool)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if self._is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        name = getattr(func, "__name__", "")
        if name == "cuda":
            return args[0]
        if name == "to" and args and len(args) > 1 and self._is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        if name == "type" and len(args) == 1 and not kwargs:
            out = func(*args)
            return self._TYPE_NAMES.get(out, out)
        return func(*args, **kwargs)


class _DummyStream:
    def wait_stream(self, *_a, **_k):
        pass

    def synchronize(self):
        pass

    def record_event(self, *_a, **_k):
        return None


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Named CPU generator states, forked like the CUDA tracker forks CUDA states."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)
            self._is_initialized = True

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


_NORM_PATCHED = False


def patch_torch_norm_for_sequence_parallel():
    """Not a CUDA shim: the local spec's torch RMSNorm refuses sequence parallel on any device
    (without apex), so this applies on GPUs too; TE specs never use it."""
    global _NORM_PATCHED
    if _NORM_PATCHED:
        return
    _NORM_PATCHED = True
    from megatron.core.transformer import torch_norm

    class SequenceParallelTorchNorm(torch_norm.WrappedTorchNorm):
        def __new__(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                    zero_centered_gamma=False, normalization="LayerNorm"):
            sp = config.sequence_parallel
            config.sequence_parallel = False  # skip the upstream assert, then tag params
            try:
                norm = super().__new__(cls, config, hidden_size, eps, persist_layer_norm,
                                       zero_centered_gamma, normalization)
            finally:
                config.sequence_parallel = sp
            for p in norm.parameters():
                p.sequence_parallel = sp
            return norm

    from megatron.core.models import backends
    from megatron.core.transformer import transformer_block

    # Module-level names read when specs are built: the layer norms (LocalSpecProvider) and the
    # block's final norm (transformer_block.LayerNormImpl).
    torch_norm.WrappedTorchNorm = backends.WrappedTorchNorm = SequenceParallelTorchNorm
    if not backends.HAVE_APEX:
        backends.LNImpl = SequenceParallelTorchNorm
    if transformer_block.LayerNormImpl.__name__ == "WrappedTorchNorm":
        transformer_block.LayerNormImpl = SequenceParallelTorchNorm


def install() -> bool:
    """Apply the CPU patches once. Returns True when they are active (no CUDA)."""
    global _INSTALLED
    if cuda_available():
        return False
    if _INSTALLED:
        return True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _DummyStream()
    _patch_recompute_rng()
    _CudaToCpuMode().__enter__()  # stays active for the life of the process
    _INSTALLED = True
    return True


def _patch_recompute_rng() -> None:
    """Activation recompute saves and restores "the CUDA RNG state": on CPU, the CPU one."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # recomputed forwards run inside autograd's backward, where our torch-function mode does not
    # reach: the causal-mask helper must not ask for a CUDA tensor itself
    from functools import lru_cache

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    @lru_cache(maxsize=32)
    def causal_mask(sq: int):
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    utils.get_default_causal_mask = fused_softmax.get_default_causal_mask = causal_mask


def seed_cpu_rng_tracker(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0) -> None:
    """CPU twin of megatron's model_parallel_cuda_manual_seed: same names, same seed offsets."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = _cpu_rng_tracker_class()()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
