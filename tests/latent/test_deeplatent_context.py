"""DeepLatent's context pass (spec 2.7, oracle 16) and its alignment term (oracle 12).

Block 1's modulation states come from a prefix without latents, so one pass gives them exactly;
block 2's prefix holds block 1's latents, which the first pass has not got (pads instead): its
states differ until a second pass, after which another pass changes nothing (fp32, tiny model,
rows with two blocks)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_latent.conversion.hf_load import load_hf_weights
from megatron_latent.latent import registry
from megatron_latent.latent.deeplatent import _ContextPass
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.models.qwen25vl.model import Qwen25VLModel
from megatron_latent.testing.method_kits import KITS
from megatron_latent.training.step import forward_outputs


def test_alignment_hand_worked():
    """Oracle 12: teacher [1, 0], student [1, 1] -> 1 - 1/sqrt(2) = 0.292893; over 2 layers x 3
    slots with the other 5 pairs identical -> 0.048816."""
    t, s = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    one = 1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)
    assert one.item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    same = torch.zeros(5)
    assert torch.cat([one, same]).mean().item() == pytest.approx(0.048816, abs=1e-6)


@pytest.fixture(scope="module")
def two_block_batch(tiny_ckpts, tmp_path_factory, megatron_single_rank):
    from transformers import AutoProcessor

    root = tmp_path_factory.mktemp("ctx")
    path = tiny_ckpts["tiny-a"]
    proc, cfg = AutoProcessor.from_pretrained(path), Qwen25VLConfig.from_hf(path)
    hp = KITS["deeplatent"].hparams(root, path)
    method = registry.build("deeplatent", proc.tokenizer, cfg, hp)
    ds = method.sft_dataset(KITS["deeplatent"].make_data(root), tokenizer=proc.tokenizer,
                            image_processor=proc.image_processor, vocab_size=cfg.vocab_size,
                            seq_length=2048, min_pixels=3136, max_pixels=50176)
    mb = ds.collate([ds[0], ds[1]])
    model = Qwen25VLModel(cfg, latent_modules=method.build_modules(cfg, pre_process=True,
                                                                   post_process=True))
    load_hf_weights(model, path)
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero modulation, so the latents depend on the states
        for name in ("mlp_l", "mlp_i"):
            getattr(model.latent_modules, name).fc2.weight.normal_(0, 0.05)
    model.eval()
    method.prepare_step([model], [dict(mb)], forward_outputs)  # fixes sigma_f, as a run does
    return method, model, mb


def _passes(method, model, mb, n):
    """The modulation states [n_blocks, 3, h] after n context passes."""
    prev = None
    for _ in range(n):
        prev = [forward_outputs([model], [mb], _ContextPass(method, prev))[0]]
    return prev[0]


def test_context_passes(two_block_batch):
    method, model, mb = two_block_batch
    blocks = mb["blocks"].tolist()
    second = [k for k in range(len(blocks)) if k > 0 and blocks[k][0] == blocks[k - 1][0]]
    first = [k for k in range(len(blocks)) if k not in second]
    assert second, "the data must have rows with two blocks"
    one, two, three = (_passes(method, model, mb, n) for n in (1, 2, 3))
    assert (one[first] - two[first]).abs().max().item() <= 1e-6  # exact after one pass
    assert (one[second] - two[second]).abs().max().item() > 1e-3  # block 2 saw pads
    assert (two - three).abs().max().item() <= 1e-6  # two passes: both blocks exact
