"""Weight gradients accumulated straight into DDP's fp32 `main_grad` by the wgrad GEMM, instead
of a bf16 grad that DDP's hook then adds: one fewer pass over every weight gradient per
micro-batch (the adds were ~15 ms of a 7B-shaped 8k-token step on an H200).

- TE linears: their own `fuse_wgrad_accumulation` switch.
- megatron's ColumnParallelLinear (the untied output layer): its `gradient_accumulation_fusion`
  path calls Apex's `fused_weight_gradient_mlp_cuda`; where Apex is absent, a torch-native
  stand-in does the same GEMM with cuBLAS (bf16 inputs, fp32 accumulator: `addmm` with
  `out_dtype`). megatron's config switch would also demand Apex at build time, hence per module.
"""

from __future__ import annotations

import torch


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


def fuse_wgrad_accumulation(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """Switch every trainable TE linear, and megatron ColumnParallelLinear with its own weight,
    to accumulate into `main_grad` (call after DDP wrapping, which creates main_grad). Returns
    the (module, attribute) pairs switched. Switch back only between steps: a fused backward
    marks the weight `grad_added_to_main_grad` until the grad buffer is zeroed, and DDP's hook
    would skip an unfused gradient of the same step."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

    def trainable(m) -> bool:
        ws = [p for n, p in m.named_parameters(recurse=False) if "weight" in n]
        return bool(ws) and all(p.requires_grad and hasattr(p, "main_grad") for p in ws)

    switched = []
    for m in model.modules():
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
    return switched
