"""The tiny offline Qwen2.5-VL checkpoint loads and runs with stock transformers."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from megatron_latent.testing.tiny_checkpoint import PRESETS, SPECIAL_TOKENS, make_tiny_qwen25vl  # noqa: E402

PRESET_NAMES = ["tiny-a", "tiny-b"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_qwen25vl(root / name, preset=name, seed=0) for name in PRESET_NAMES}


@pytest.fixture(scope="module")
def photo():
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((150, 100), Image.BICUBIC)  # odd size, not /28


def _chat_inputs(processor, photo):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert "<|vision_start|><|image_pad|><|vision_end|>What is in the picture?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    return processor(text=[text], images=[photo], return_tensors="pt")


def test_special_token_ids_match_config(ckpts):
    from transformers import AutoTokenizer

    for path in ckpts.values():
        cfg = json.loads((path / "config.json").read_text())
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok.convert_tokens_to_ids(SPECIAL_TOKENS)
        assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))  # consecutive, Qwen order
        assert ids[0] == len(tok) - len(SPECIAL_TOKENS)  # right after the BPE vocab
        assert 400 <= ids[0] <= 600
        tid = dict(zip(SPECIAL_TOKENS, ids))
        assert cfg["image_token_id"] == tid["<|image_pad|>"]
        assert cfg["video_token_id"] == tid["<|video_pad|>"]
        assert cfg["vision_start_token_id"] == tid["<|vision_start|>"]
        assert cfg["vision_end_token_id"] == tid["<|vision_end|>"]
        text = cfg["text_config"]
        assert text["bos_token_id"] == text["pad_token_id"] == tid["<|endoftext|>"] == tok.pad_token_id
        assert text["eos_token_id"] == tid["<|im_end|>"] == tok.eos_token_id
        vocab = text["vocab_size"]
        assert vocab % 64 == 0 and vocab - len(tok) >= 8  # slack rows for extra special tokens
        # Real byte-level BPE: merges are used, any text round-trips, specials stay whole.
        s = "The cup of coffee is on the table.\n\nNaïve café — 42 €!"
        enc = tok(s)["input_ids"]
        assert len(enc) < len(s.encode()) and tok.decode(enc) == s
        assert tok("<|im_start|>user\n")["input_ids"][0] == tid["<|im_start|>"]


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_hf_loads_processes_and_runs(ckpts, photo, preset):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    path = ckpts[preset]
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    model.eval()
    cfg = model.config
    assert model.dtype == torch.float32
    tied = PRESETS[preset]["tie_word_embeddings"]
    assert cfg.tie_word_embeddings is tied
    emb, head = model.get_input_embeddings().weight, model.lm_head.weight
    assert (emb.data_ptr() == head.data_ptr()) is tied
    assert cfg.text_config.rope_parameters["mrope_section"] == [2, 3, 3]

    processor = AutoProcessor.from_pretrained(path)
    inputs = _chat_inputs(processor, photo)
    ids, grid = inputs["input_ids"][0], inputs["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 10]]  # 100x150 -> 112x140 pixels -> 8x10 patches of 14
    n_pad = int((ids == cfg.image_token_id).sum())
    assert n_pad == int(grid.prod()) // 4 == 20
    start = int((ids == cfg.vision_start_token_id).nonzero()[0])
    assert ids[start + 1 + n_pad] == cfg.vision_end_token_id  # pads are contiguous
    assert inputs["pixel_values"].shape == (80, 3 * 2 * 14 * 14)
    assert inputs["mm_token_type_ids"].sum() == n_pad  # needed for M-RoPE positions in 5.x

    # Windowed vision attention must matter: the 4x5 merged grid spans several windows.
    vcfg = cfg.vision_config
    win = vcfg.window_size // vcfg.spatial_merge_size // vcfg.patch_size
    assert 1 < win < 5 and max(vcfg.fullatt_block_indexes) < vcfg.depth

    with torch.no_grad():
        logits = model(**inputs).logits
        no_mrope = model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"}).logits
    assert logits.shape == (1, ids.numel(), cfg.text_config.vocab_size)
    assert torch.isfinite(logits).all() and 0.1 < logits.std() < 10
    assert not torch.allclose(logits, no_mrope)  # without mm_token_type_ids HF falls back to 1-D RoPE


def test_every_tensor_is_randomized(ckpts):
    from safetensors.torch import load_file

    sd = load_file(ckpts["tiny-b"] / "model.safetensors")
    assert "lm_head.weight" in sd and "visual.merger.mlp.0.bias" in sd  # hub key layout, untied
    for name, t in sd.items():
        assert t.dtype == torch.float32, name
        if name.endswith(".bias"):
            assert t.abs().min() > 0 and t.std() > 0.005, name
        elif t.ndim == 1:
            assert not torch.allclose(t, torch.ones_like(t)) and (t - 1).abs().mean() < 0.3, name
    assert "lm_head.weight" not in load_file(ckpts["tiny-a"] / "model.safetensors")  # tied


def test_deterministic_per_seed(ckpts, tmp_path):
    again = make_tiny_qwen25vl(tmp_path / "again", preset="tiny-a", seed=0)
    other = make_tiny_qwen25vl(tmp_path / "other", preset="tiny-a", seed=1)
    ref = ckpts["tiny-a"]
    for f in sorted(p.name for p in ref.iterdir()):
        assert (again / f).read_bytes() == (ref / f).read_bytes(), f
    assert (other / "model.safetensors").read_bytes() != (ref / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (ref / "tokenizer.json").read_bytes()


def test_overrides_and_overwrite(tmp_path):
    out = make_tiny_qwen25vl(tmp_path / "c", preset="tiny-a", num_hidden_layers=3, tie_word_embeddings=False,
                             vision_overrides={"depth": 2, "fullatt_block_indexes": [1]})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 3 and cfg["vision_config"]["depth"] == 2
    assert cfg["tie_word_embeddings"] is False
    with pytest.raises(FileExistsError):
        make_tiny_qwen25vl(out, preset="tiny-b")
    with pytest.raises(ValueError, match="mrope_section"):
        make_tiny_qwen25vl(tmp_path / "bad", mrope_section=[4, 4, 4])
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # failed builds leave no temp dirs

    spec = importlib.util.spec_from_file_location("make_tiny_cli", REPO_ROOT / "tools" / "make_tiny_qwen25vl.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--out", str(out), "--preset", "tiny-b"]) == 1  # refuses non-empty dir
    assert cli.main(["--out", str(out), "--preset", "tiny-b", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["text_config"]["hidden_size"] == 96
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
