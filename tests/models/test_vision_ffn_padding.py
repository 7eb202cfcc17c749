"""The vision MLP's zero padding (Qwen25VLConfig.vision_ffn_padded_size) changes nothing: a
randomly initialised padded tower equals the unpadded tower holding the same real weights (fp32,
CPU), so the fresh padding is zero too (the export to HF drops it). Converted weights are covered
by tests/models/test_hf_parity.py (tiny-b's 96-wide MLP is padded to 128)."""

from __future__ import annotations

import torch

from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.models.qwen25vl.vision import Qwen25VisionModel
from megatron_latent.testing.samples import two_sample_batch


def test_padded_tower_equals_unpadded(tiny_ckpts, megatron_single_rank):
    from transformers import AutoProcessor

    path = tiny_ckpts["tiny-b"]
    padded_cfg = Qwen25VLConfig.from_hf(path)
    plain_cfg = Qwen25VLConfig.from_hf(path, vision_ffn_divisible_by=1)
    real, width = plain_cfg.vision_ffn_padded_size, padded_cfg.vision_ffn_padded_size
    assert (real, width) == (96, 128)
    torch.manual_seed(0)
    padded = Qwen25VisionModel(padded_cfg)
    plain = Qwen25VisionModel(plain_cfg)
    state = {}
    for name, t in padded.state_dict().items():
        if name.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")):
            t = t.view(2, width, *t.shape[1:])[:, :real].reshape(2 * real, *t.shape[1:])
        elif name.endswith("mlp.linear_fc2.weight"):
            t = t[:, :real]
        state[name] = t
    plain.load_state_dict(state)

    batch = two_sample_batch(AutoProcessor.from_pretrained(path), padded_cfg)
    with torch.no_grad():
        want = plain(batch["pixel_values"], batch["image_grid_thw"])
        got = padded(batch["pixel_values"], batch["image_grid_thw"])
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_padding_is_independent_of_tp_and_stored_in_checkpoints(tiny_ckpts, tmp_path):
    """Checkpoints hold global shapes and reshard: the padded width must not depend on TP. The
    padding travels in the checkpoint's metadata; one written before it existed (no field)
    holds the unpadded MLP and loads that way."""
    import json

    from megatron_latent import checkpointing

    path = tiny_ckpts["tiny-b"]
    widths = {tp: Qwen25VLConfig.from_hf(path, tensor_model_parallel_size=tp).validated()
              .vision_ffn_padded_size for tp in (1, 2)}
    assert widths == {1: 128, 2: 128}
    with open(f"{path}/config.json") as f:
        hf_config = json.load(f)
    checkpointing.write_metadata(tmp_path, hf_config, "local", torch.float32, None,
                                 vision_ffn_divisible_by=64)
    assert checkpointing.config_from_checkpoint(tmp_path).vision_ffn_padded_size == 128
    meta_file = tmp_path / checkpointing.META
    meta = json.loads(meta_file.read_text())
    del meta["vision_ffn_divisible_by"]  # as written before the padding existed
    meta_file.write_text(json.dumps(meta))
    assert checkpointing.config_from_checkpoint(tmp_path).vision_ffn_padded_size == 96
