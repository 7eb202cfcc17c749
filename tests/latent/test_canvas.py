"""HyLaR's canvas encoder: parity with a plain-PyTorch reference written from the spec (oracle 1),
HyLaR's parameter names, SigLIP kept out of the module state, and the SigLIP loader."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from megatron_latent.data.sample_inputs import sample_photo
from megatron_latent.latent.canvas import CanvasEncoder, load_siglip, siglip_fingerprint
from megatron_latent.testing.tiny_siglip import make_tiny_siglip

D, HEADS, LAYERS, QUERIES, HIDDEN = 32, 2, 2, 4, 64


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return make_tiny_siglip(tmp_path_factory.mktemp("siglip") / "v5")


@pytest.fixture(scope="module")
def loaded(siglip_dir):
    return load_siglip(siglip_dir)


def make_encoder(siglip, seed=0):
    torch.manual_seed(seed)
    return CanvasEncoder(D, HIDDEN, siglip, n_queries=QUERIES, n_layers=LAYERS, n_heads=HEADS)


class RefCompressor(nn.Module):
    """From the spec (1.3): learnable queries; per layer q += SA(LN(q)); q += CA(LN(q), P, P);
    q += W2 GELU(W1 LN(q)); final LN. Names as HyLaR's checkpoints."""

    def __init__(self, d, heads, layers, queries, mult=4):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(queries, d))
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            self_attn=nn.MultiheadAttention(d, heads, batch_first=True),
            cross_attn=nn.MultiheadAttention(d, heads, batch_first=True),
            self_attn_norm=nn.LayerNorm(d), cross_attn_norm=nn.LayerNorm(d), ffn_norm=nn.LayerNorm(d),
            ffn=nn.ModuleDict({"0": nn.Linear(d, mult * d), "3": nn.Linear(mult * d, d)})))
            for _ in range(layers))
        self.final_norm = nn.LayerNorm(d)

    def forward(self, patches):
        q = self.queries[None].repeat(len(patches), 1, 1)
        for m in self.layers:
            h = m["self_attn_norm"](q)
            q = q + m["self_attn"](h, h, h)[0]  # need_weights=True: the other MHA code path
            q = q + m["cross_attn"](m["cross_attn_norm"](q), patches, patches)[0]
            h = m["ffn_norm"](q)
            q = q + m["ffn"]["3"](F.gelu(m["ffn"]["0"](h), approximate="none"))
        return self.final_norm(q)


def canvas_pixels(processor):
    """Sample 0 has one reasoning image, sample 1 two: concatenated in sample order."""
    imgs = [sample_photo("astronaut").resize((90, 70)), sample_photo("coffee").resize((60, 80)),
            sample_photo("chelsea")]
    return processor(images=imgs, do_convert_rgb=True, return_tensors="pt")["pixel_values"]


def test_canvas_matches_reference(loaded):
    siglip, processor = loaded
    enc = make_encoder(siglip)
    with torch.no_grad():  # non-trivial norms and biases so every tensor matters
        for name, p in enc.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    pixels = canvas_pixels(processor)
    assert pixels.shape == (3, 3, 56, 56)
    c = enc(pixels)
    assert c.shape == (3, QUERIES, HIDDEN) and c.requires_grad

    ref = RefCompressor(D, HEADS, LAYERS, QUERIES)
    ref.load_state_dict({k.removeprefix("compressor."): v for k, v in enc.state_dict().items()
                         if k.startswith("compressor.")}, strict=True)
    with torch.no_grad():
        patches = siglip(pixel_values=pixels).last_hidden_state
        assert patches.shape == (3, 16, D)
        want = F.linear(ref(patches), enc.canvas_proj.weight, enc.canvas_proj.bias)
        one = enc(pixels[1:2])  # per image: independent of the other images in the batch
    torch.testing.assert_close(c.detach(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(one, want[1:2], rtol=0, atol=1e-6)
    c.square().sum().backward()
    assert enc.compressor.queries.grad.abs().sum() > 0 and enc.canvas_proj.weight.grad is not None


def test_hylar_parameter_names(loaded):
    names = set(make_encoder(loaded[0]).state_dict())
    per_layer = [f"{m}.{p}" for m in ("self_attn", "cross_attn")
                 for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")]
    per_layer += [f"{n}.{p}" for n in ("self_attn_norm", "cross_attn_norm", "ffn_norm", "ffn.0", "ffn.3")
                  for p in ("weight", "bias")]
    want = {"compressor.queries", "compressor.final_norm.weight", "compressor.final_norm.bias",
            "canvas_proj.weight", "canvas_proj.bias"}
    want |= {f"compressor.layers.{i}.{n}" for i in range(LAYERS) for n in per_layer}
    assert names == want


def test_siglip_held_outside_the_module(loaded):
    siglip, processor = loaded
    enc = make_encoder(siglip)
    n_own = sum(p.numel() for p in enc.compressor.parameters()) + sum(
        p.numel() for p in enc.canvas_proj.parameters())
    assert sum(p.numel() for p in enc.parameters()) == n_own
    assert not any("siglip" in k or "embeddings" in k for k in enc.state_dict())
    assert not any(p.requires_grad for p in siglip.parameters()) and not siglip.training
    enc.train()
    pixels = canvas_pixels(processor)
    enc.double()  # SigLIP follows the compute dtype on the next forward
    out = enc(pixels)
    assert out.dtype == torch.float64 and next(siglip.parameters()).dtype == torch.float64
    assert not siglip.training
    siglip.float()
    empty = enc(pixels[:0])
    assert empty.shape == (0, QUERIES, HIDDEN) and empty.dtype == torch.float64


def test_siglip_name_layouts_load_the_same(siglip_dir, loaded, tmp_path):
    legacy = make_tiny_siglip(tmp_path / "v4", prefix="vision_model.")
    assert all(k.startswith("vision_model.") for k in load_file(legacy / "model.safetensors"))
    full = tmp_path / "full"  # a full SigLIP checkpoint: vision_config plus a text tower to drop
    full.mkdir()
    weights = load_file(legacy / "model.safetensors")
    weights |= {"text_model.embeddings.token_embedding.weight": torch.zeros(10, 8),
                "logit_scale": torch.zeros(1), "logit_bias": torch.zeros(1)}
    save_file(weights, str(full / "model.safetensors"))
    vc = json.loads((legacy / "config.json").read_text())
    (full / "config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": vc,
                                                  "text_config": {"hidden_size": 8}}))
    (full / "preprocessor_config.json").write_text((legacy / "preprocessor_config.json").read_text())

    pixels = canvas_pixels(loaded[1])
    with torch.no_grad():
        want = loaded[0](pixel_values=pixels).last_hidden_state
        for d in (legacy, full):
            model, processor = load_siglip(d)
            assert processor.resample == 2 and processor.size["height"] == 56
            torch.testing.assert_close(model(pixel_values=pixels).last_hidden_state, want,
                                       rtol=0, atol=0)
    assert siglip_fingerprint(siglip_dir) != siglip_fingerprint(legacy)


def test_siglip_bad_weights_name_the_file(siglip_dir, tmp_path):
    bad = make_tiny_siglip(tmp_path / "bad")
    weights = load_file(bad / "model.safetensors")
    del weights["encoder.layers.1.mlp.fc2.weight"]
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"bad/model\.safetensors.*encoder\.layers\.1\.mlp\.fc2\.weight"):
        load_siglip(bad)
    weights["encoder.layers.1.mlp.fc2.weight"] = torch.zeros(3, 3)
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"bad/model\.safetensors.*fc2\.weight has shape \(3, 3\)"):
        load_siglip(bad)
    weights["encoder.layers.1.mlp.fc2.weight"] = torch.zeros(32, 64)
    weights["encoder.layers.9.extra"] = torch.zeros(1)
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"bad/model\.safetensors: unexpected keys .*layers\.9\.extra"):
        load_siglip(bad)
