"""Weight gradients accumulated straight into DDP's fp32 `main_grad` by the wgrad GEMM, instead
of a bf16 grad that DDP's hook then adds: one fewer pass over every weight gradient per
micro-batch (the adds were ~15 ms of a 7B-shaped 8k-token step on an H200).

- TE linears: their own `fuse_wgrad_accumulation` switch.
- megatron's ColumnParallelLinear (the untied output layer): its `gradient_accumulation_fusion`
  path calls Apex's `fused_weight_gradient_mlp_cuda`; where Apex is absent, a torch-native
  stand-in does the same GEMM with cuBLAS (bf16 inputs, fp32 accumulator: `addmm` with
  `out_dtype`). megatron's config switch would also demand Apex at build time, hence per module.
- The word embedding (untied, or tied but on a stage without the output layer): its lookup's
  backward scatters the output gradient's rows into `main_grad` (`index_add_`), instead of a
  dense [vocab, hidden] bf16 gradient (a zero-fill of the whole table per micro-batch) that
  DDP's hook then adds to the fp32 buffer (~2.5 ms per micro-batch at the 7B shape).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class TorchWgradAccum:
    """The two functions megatron calls on Apex's fused_weight_gradient_mlp_cuda:
    main_grad [out, in] += grad_output[tokens, out]^T @ input[tokens, in]."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad):
        if total_input.dtype == torch.float32:  # fp32 params: a plain in-place GEMM
            main_grad.addmm_(grad_output.t(), total_input)
        else:  # bf16/fp16 inputs, fp32 accumulator and output: one cuBLAS call
            torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32,
                        out=main_grad)

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input, grad_output, main_grad):
        main_grad.addmm_(grad_output.t(), total_input)


_TORCH_ACCUM_OK: bool | None = None


def _torch_accum_works() -> bool:
    """addmm with out_dtype (torch >= 2.8, CUDA): checked once on a hand-worked 2x2 case."""
    global _TORCH_ACCUM_OK
    if _TORCH_ACCUM_OK is None:
        try:
            a = torch.ones(2, 2, dtype=torch.bfloat16, device="cuda")
            c = torch.ones(2, 2, device="cuda")
            torch.addmm(c, a, a, out_dtype=torch.float32, out=c)  # 1 + (1*1 + 1*1) = 3
            _TORCH_ACCUM_OK = bool(torch.equal(c, torch.full_like(c, 3.0)))
        except (TypeError, RuntimeError):
            _TORCH_ACCUM_OK = False
    return _TORCH_ACCUM_OK


def _megatron_wgrad_kernel() -> bool:
    """Whether megatron's fused path has a kernel: Apex's, or the torch-native stand-in."""
    from megatron.core.tensor_parallel import layers

    if layers._grad_accum_fusion_available:
        return True
    if not _torch_accum_works():
        return False
    layers.fused_weight_gradient_mlp_cuda = TorchWgradAccum
    return True


def _dummy_wgrad(weight: torch.nn.Parameter) -> torch.Tensor:
    """What a fused backward hands autograd for the weight, as megatron's own fused layers do:
    a full-shape tensor makes AccumulateGrad run, hence DDP's hook (it drops it after seeing
    `grad_added_to_main_grad`); uninitialised unless the param asks for a zeroed one."""
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return make(weight.main_grad.shape, dtype=weight.dtype, device=weight.device)


class _EmbeddingIntoMainGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        w = ctx.weight
        w.main_grad.index_add_(0, ids.reshape(-1),
                               grad.reshape(-1, grad.shape[-1]).to(w.main_grad.dtype))
        w.grad_added_to_main_grad = True
        return None, _dummy_wgrad(w)


# F.embedding options that change the lookup or its gradient: routed only when all are off
_PLAIN_LOOKUP = ("padding_idx", "max_norm", "scale_grad_by_freq", "sparse")


class _RouteEmbedding(TorchFunctionMode):
    """Sends `F.embedding(ids, weight)` of one weight through `_EmbeddingIntoMainGrad`; every
    other call passes through. A function mode rather than a copy of megatron's
    VocabParallelEmbedding.forward: its TP masking and reductions stay megatron's."""

    def __init__(self, weight: torch.nn.Parameter):
        super().__init__()
        self.weight = weight

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is F.embedding and len(args) == 2 and args[1] is self.weight
                and all(kwargs.get(k) in (None, False) for k in _PLAIN_LOOKUP)):
            return _EmbeddingIntoMainGrad.apply(args[0], self.weight)
        return func(*args, **kwargs)


@contextmanager
def embedding_wgrad_into_main_grad(weight: torch.nn.Parameter):
    """Active around the embedding lookup of a training forward (Qwen25VLModel.embed)."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        yield
        return
    with _RouteEmbedding(weight):
        yield


def _fuse_embedding(model: torch.nn.Module) -> bool:
    """The word embedding of a first-stage Qwen25VLModel, unless tied to an output layer on the
    same stage: that layer's dense gradient arrives summed with ours in one AccumulateGrad, and
    DDP's hook, seeing the flag, would drop it."""
    emb = getattr(getattr(model, "language_model", None), "embedding", None)
    if emb is None or not hasattr(model, "embedding_grad_route"):
        return False
    w = emb.word_embeddings.weight
    if not (w.requires_grad and hasattr(w, "main_grad")) or emb.word_embeddings.deterministic_mode:
        return False
    if model.share_embeddings_and_output_weights and model.post_process:
        return False
    model.embedding_grad_route = lambda: embedding_wgrad_into_main_grad(w)
    return True


def fuse_wgrad_accumulation(model: torch.nn.Module, linears: bool = True
                            ) -> list[tuple[torch.nn.Module, str]]:
    """Switch every trainable TE linear, megatron ColumnParallelLinear with its own weight, and
    the word embedding to accumulate into `main_grad` (call after DDP wrapping, which creates
    main_grad). Returns the (module, attribute) pairs switched (the embedding's entry is
    (model, "embedding_grad_route"); switch it back with `contextlib.nullcontext`, the linears'
    with False). Switch back only between steps: a fused backward marks the weight `grad_added_to_main_grad` until the grad buffer is
    zeroed, and DDP's hook would skip an unfused gradient of the same step. `linears=False`
    switches the embedding only (the linears' fused GEMMs need CUDA; the scatter runs
    anywhere)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    try:
        from transformer_engine.pytorch.module.base import TransformerEngineBaseModule
    except ImportError:
        TransformerEngineBaseModule = ()  # noqa: N806 (no TE: isinstance never matches)

    def trainable(m) -> bool:
        ws = [p for n, p in m.named_parameters(recurse=False) if "weight" in n]
        return bool(ws) and all(p.requires_grad and hasattr(p, "main_grad") for p in ws)

    switched = []
    for m in model.modules() if linears else ():
        if isinstance(m, TransformerEngineBaseModule) and hasattr(m, "fuse_wgrad_accumulation"):
            attr = "fuse_wgrad_accumulation"
        elif isinstance(m, ColumnParallelLinear) and m.weight is not None:
            # a tied output layer at PP=1 has no weight of its own (it reads the embedding's);
            # at PP>1 the last stage's copy is switched: finalize_model_grads all-reduces its
            # main_grad with the embedding's
            attr = "gradient_accumulation_fusion"
        else:
            continue
        if trainable(m):
            if attr == "gradient_accumulation_fusion" and not _megatron_wgrad_kernel():
                continue  # torch < 2.8 without Apex: that layer stays unfused
            setattr(m, attr, True)
            switched.append((m, attr))
    if _fuse_embedding(model):
        switched.append((model, "embedding_grad_route"))
    return switched
