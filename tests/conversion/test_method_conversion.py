"""Conversion with latent methods: HF -> Megatron -> HF is bit-exact for every registered
method, side modules included (their own safetensors file, the method in latent_method.json);
HyLaR's mid-SFT layout (its modules embedded as canvas_extractor.*, the frozen SigLIP too)
imports its compressor and projector and drops SigLIP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_latent import checkpointing
from megatron_latent.conversion import convert
from megatron_latent.conversion.side_modules import SIDE_FILE
from megatron_latent.latent import registry
from megatron_latent.latent.registry import HF_METHOD_FILE
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig

METHODS = registry.names()
# tiny hyper-parameters of methods whose defaults build large side modules
HPARAMS = {"hylar": {"canvas_tokens": 4, "encoder_dim": 32, "compressor_heads": 2},
           "deeplatent": {"stage": 2}}


def _side_tensors(name: str, src: str, seed: int) -> dict:
    """Random side-module tensors of the method's shapes (none for methods without modules)."""
    from transformers import AutoTokenizer

    cfg = Qwen25VLConfig.from_hf(src)
    method = registry.build(name, AutoTokenizer.from_pretrained(src), cfg, HPARAMS.get(name))
    modules = method.build_modules(cfg, pre_process=True, post_process=True)
    if modules is None:
        return {}
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) for k, v in modules.state_dict().items()
            if not k.endswith("_extra_state")}


def _method_hf_dir(src: str, out: Path, name: str) -> Path:
    shutil.copytree(src, out)
    (out / HF_METHOD_FILE).write_text(json.dumps({"name": name, "hparams": HPARAMS.get(name, {})}))
    side = _side_tensors(name, src, seed=1)
    if side:
        save_file(side, out / SIDE_FILE)
    return out


def _tensors(d: Path, pattern: str = "model*.safetensors") -> dict:
    return {k: v for f in sorted(d.glob(pattern)) for k, v in load_file(f).items()}


@pytest.mark.parametrize("name", METHODS)
def test_round_trip_with_method_is_bit_exact(name, tiny_ckpts, tmp_path, megatron_single_rank):
    hf = _method_hf_dir(tiny_ckpts["tiny-b"], tmp_path / "hf", name)
    ckpt, back = tmp_path / "mc", tmp_path / "back"
    convert.hf_to_megatron(hf, ckpt)
    assert checkpointing.read_metadata(ckpt)["latent_method"]["name"] == name
    convert.megatron_to_hf(ckpt, back)
    a, b = _tensors(hf), _tensors(back)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    side_a = _tensors(hf, SIDE_FILE)
    assert set(side_a) == set(_tensors(back, SIDE_FILE))
    assert all(torch.equal(v, _tensors(back, SIDE_FILE)[k]) for k, v in side_a.items())
    assert bool(side_a) == (name in ("hylar", "deeplatent"))
    record = json.loads((back / HF_METHOD_FILE).read_text())
    assert record["name"] == name and all(record["hparams"][k] == v
                                          for k, v in HPARAMS.get(name, {}).items())


def test_hylar_mid_sft_layout_imports(tiny_ckpts, tmp_path, megatron_single_rank):
    """HyLaR's HF-Trainer checkpoints hold the canvas modules inside model.safetensors under
    canvas_extractor.* and config.json's canvas_* keys mark the method."""
    src = Path(tiny_ckpts["tiny-b"])
    hf = tmp_path / "hylar_sft"
    shutil.copytree(src, hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(canvas_id=9, canvas_start_id=10, canvas_end_id=11, canvas_token_num=4)
    (hf / "config.json").write_text(json.dumps(cfg))
    weights = load_file(hf / "model.safetensors")
    side = _side_tensors("hylar", src, seed=2)
    weights.update({f"canvas_extractor.{k}": v for k, v in side.items()})
    # the frozen SigLIP: dropped on import, not mistaken for one of ours
    weights["canvas_extractor.siglip2_vision.vision_model.post_layernorm.weight"] = torch.ones(32)
    save_file(weights, hf / "model.safetensors")
    # the config keys alone say HyLaR at its real width (1152): our tiny modules do not fit
    with pytest.raises(ValueError, match="shape"):
        convert.hf_to_megatron(hf, tmp_path / "default_width")
    assert not (tmp_path / "default_width").exists()
    (hf / HF_METHOD_FILE).write_text(json.dumps({"name": "hylar", "hparams": HPARAMS["hylar"]}))
    convert.hf_to_megatron(hf, tmp_path / "mc")
    convert.megatron_to_hf(tmp_path / "mc", tmp_path / "back")
    got = _tensors(tmp_path / "back", SIDE_FILE)
    assert set(got) == set(side) and all(torch.equal(got[k], side[k]) for k in side)
    exported = _tensors(tmp_path / "back")
    assert not any(k.startswith("canvas_extractor.") for k in exported)
    back_cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back_cfg["canvas_token_num"] == 4 and back_cfg["canvas_loss"] == "mse"
