"""On 2 GPUs (NCCL): TP=2, TP=2 + sequence parallel and PP=2 equal TP=1, with the TE spec and the
local spec, in fp32 (logits, loss, and loss after one Adam step).

The local spec computes in true fp32 (torch keeps TF32 off for matmuls) and must match as on CPU.
TE runs fp32 GEMMs with TF32 tensor cores (10-bit mantissa), so split reductions differ at the
1e-3 level; measured on 2 x H200: logits 1.5e-3, loss 3e-5. Its tolerances are set for TF32."""

from __future__ import annotations

import pytest
import torch

from megatron_latent.testing.distributed import run_distributed
from megatron_latent.testing.launcher_workers import collective_graph_teardown
from megatron_latent.testing.parity_workers import layout_run

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("spec", ["te", "local"])
def test_layouts_equal_on_two_gpus(spec, tiny_ckpts, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    if spec == "te":
        pytest.importorskip("transformer_engine")
    layouts = [dict(name="tp1", spec=spec), dict(name="tp2", tp=2, spec=spec),
               dict(name="tp2sp", tp=2, sp=True, spec=spec), dict(name="pp2", pp=2, spec=spec)]
    out = tmp_path / "res.pt"
    run_distributed(layout_run, 2, tiny_ckpts["tiny-a"], str(out), layouts)
    res = torch.load(out, weights_only=False)
    base = res["tp1"]
    real = base["attention_mask"].bool()
    for name in ("tp2", "tp2sp", "pp2"):
        r = res[name]
        diff = (r["logits"][real].cpu() - base["logits"][real].cpu()).abs().max().item()
        print(f"\n[{spec}] {name}: logits max diff {diff:.2e}, loss {r['loss']:.6f} vs "
              f"{base['loss']:.6f}, after step {r['loss_after']:.6f} vs {base['loss_after']:.6f}")
        logit_tol, loss_tol = (5e-3, 2e-4) if spec == "te" else (1e-5, 1e-5)
        assert diff <= logit_tol
        assert abs(r["loss"] - base["loss"]) <= loss_tol
        assert abs(r["loss_after"] - base["loss_after"]) <= loss_tol


def test_teardown_with_a_graphed_collective():
    """parallel.destroy drops our CUDA graphs first: with a graph that captured an NCCL
    all-reduce alive, destroy_process_group never returns (NCCL 2.28)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run_distributed(collective_graph_teardown, 2, timeout=120)
