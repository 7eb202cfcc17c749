"""Bad input gets a clear error that names the offending value."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_latent.conversion.hf_load import load_hf_weights
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.models.qwen25vl.model import Qwen25VLModel
from megatron_latent.testing.samples import MICRO_BATCH_KEYS, two_sample_batch


def test_not_qwen25vl(tmp_path, tiny_ckpts):
    cfg = json.loads(open(f"{tiny_ckpts['tiny-a']}/config.json").read())
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: model_type is 'llama', expected 'qwen2_5_vl'"):
        Qwen25VLConfig.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Qwen25VLConfig.from_hf(tmp_path / "missing")


def test_tp_must_divide_heads(tiny_ckpts):
    with pytest.raises(ValueError, match="tensor_model_parallel_size=3 does not divide "
                                         "num_attention_heads=4"):
        Qwen25VLConfig.from_hf(tiny_ckpts["tiny-a"], tensor_model_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_model_parallel_size=4 does not divide "
                                         "num_key_value_heads=2"):
        Qwen25VLConfig.from_hf(tiny_ckpts["tiny-a"], tensor_model_parallel_size=4)


def test_pipeline_split_must_fit(tiny_ckpts):
    with pytest.raises(ValueError, match="num_layers=3 cannot be split over pipeline_model_parallel_size=2"):
        Qwen25VLConfig.from_hf(tiny_ckpts["tiny-b"], pipeline_model_parallel_size=2)


@pytest.fixture(scope="module")
def model_and_batch(tiny_ckpts, megatron_single_rank):
    from transformers import AutoProcessor

    path = tiny_ckpts["tiny-a"]
    cfg = Qwen25VLConfig.from_hf(path)
    model = Qwen25VLModel(cfg).eval()
    load_hf_weights(model, path)
    return model, cfg, two_sample_batch(AutoProcessor.from_pretrained(path), cfg)


def test_image_grid_not_matching_image_tokens(model_and_batch):
    model, cfg, b = model_and_batch
    ids = b["input_ids"].clone()
    first = (ids[0] == cfg.image_token_id).nonzero()[0].item()
    ids[0, first] = 1  # one image token fewer than the grids give
    with pytest.raises(ValueError, match=r"input_ids hold \d+ image tokens .* gives \d+ image features"):
        model(ids, position_ids=b["position_ids"], pixel_values=b["pixel_values"],
              image_grid_thw=b["image_grid_thw"])
    grid = b["image_grid_thw"].clone()
    grid[0, 1] += 2
    with pytest.raises(ValueError, match=r"pixel_values has \d+ patches but image_grid_thw"):
        model(b["input_ids"], position_ids=b["position_ids"], pixel_values=b["pixel_values"],
              image_grid_thw=grid)


def test_video_is_rejected(model_and_batch):
    model, cfg, b = model_and_batch
    ids = b["input_ids"].clone()
    ids[0, 3] = cfg.video_token_id
    with pytest.raises(ValueError, match="video input is not supported yet"):
        model(ids, position_ids=b["position_ids"], pixel_values=b["pixel_values"],
              image_grid_thw=b["image_grid_thw"])


def test_checkpoint_with_wrong_shapes_or_foreign_tensors(tmp_path, tiny_ckpts, model_and_batch):
    from safetensors.torch import load_file, save_file

    model, cfg, _ = model_and_batch
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpts["tiny-a"], bad)
    tensors = load_file(bad / "model.safetensors")
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.o_proj.weight"))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"o_proj.weight.*give shape"):
        load_hf_weights(model, bad)
    tensors["extra.head.weight"] = torch.zeros(2)
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensors have no place in Qwen2.5-VL.*extra.head.weight"):
        load_hf_weights(model, bad)


def test_training_step_checks_with_host_counts(model_and_batch, tiny_ckpts):
    """The training step counts image/video tokens on the host (no device sync); the same
    mismatches still stop it with the model's messages."""
    from megatron_latent.training.build import OptimSettings, build_model, build_optimizer
    from megatron_latent.training.step import host_token_counts, train_step

    _, cfg, b = model_and_batch
    model = build_model(cfg, tiny_ckpts["tiny-a"])
    optimizer = build_optimizer(model, OptimSettings(lr=0.0))
    mb = {k: b[k] for k in MICRO_BATCH_KEYS}
    n_img = int((mb["input_ids"] == cfg.image_token_id).sum())
    assert host_token_counts(mb, model[0]) == (n_img, 0)  # counted on the host, exactly
    ids = mb["input_ids"].clone()
    ids[0, (ids[0] == cfg.image_token_id).nonzero()[0].item()] = 1
    with pytest.raises(ValueError, match=r"input_ids hold \d+ image tokens .* gives \d+ image"):
        train_step(model, optimizer, [{**mb, "input_ids": ids}])
    ids = mb["input_ids"].clone()
    ids[0, 3] = cfg.video_token_id
    with pytest.raises(ValueError, match="video input is not supported yet"):
        train_step(model, optimizer, [{**mb, "input_ids": ids}])
