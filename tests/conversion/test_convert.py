"""HF <-> Megatron conversion: bit-exact round trip, exported HF equals the Megatron model,
resharding on load (TP/PP), the compare tool, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_latent import checkpointing
from megatron_latent.conversion import convert
from megatron_latent.conversion.compare import compare
from megatron_latent.conversion.hf_load import HFCheckpointReader

REPO = Path(__file__).resolve().parents[2]


def _hf_tensors(d: Path) -> dict:
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def converted(tiny_ckpts, tmp_path_factory, megatron_single_rank):
    """Each preset converted HF -> Megatron (TP=1) -> HF, the export in several shards."""
    root = tmp_path_factory.mktemp("conv")
    out = {}
    for name, hf in tiny_ckpts.items():
        ckpt, back = root / f"{name}-mc", root / f"{name}-hf"
        convert.hf_to_megatron(hf, ckpt)
        convert.megatron_to_hf(ckpt, back, shard_bytes=200_000)
        out[name] = (Path(hf), ckpt, back)
    return out


@pytest.mark.parametrize("preset", ["tiny-a", "tiny-b"])
def test_round_trip_is_bit_exact(converted, preset):
    hf, _, back = converted[preset]
    a, b = _hf_tensors(hf), _hf_tensors(back)
    assert set(a) == set(b)
    assert ("lm_head.weight" in b) == (preset == "tiny-b")  # tied vs untied
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert len(list(back.glob("*.safetensors"))) > 1, "the export should be sharded"
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(a)


@pytest.mark.parametrize("preset", ["tiny-a", "tiny-b"])
def test_exported_hf_equals_megatron(converted, preset):
    from transformers import AutoProcessor

    _, ckpt, back = converted[preset]
    AutoProcessor.from_pretrained(back)  # tokenizer/processor files came along
    res = compare(back, ckpt)
    assert res["max_abs_diff"] <= 1e-4 and res["top1_agreement"] == 1.0


def test_checkpoint_layout(converted):
    _, ckpt, _ = converted["tiny-a"]
    assert checkpointing.latest_iteration(ckpt) == 0
    assert (ckpt / "iter_0000000" / "metadata.json").is_file()
    assert (ckpt / "hf" / "tokenizer.json").is_file()
    assert checkpointing.read_metadata(ckpt)["hf_config"]["model_type"] == "qwen2_5_vl"
    assert not list(ckpt.parent.glob(".*tmp*")), "no temporary directories left behind"


@pytest.mark.slow
def test_resharding_on_load(converted, tiny_ckpts, tmp_path):
    from megatron_latent.testing.distributed import run_distributed
    from megatron_latent.testing.parity_workers import reshard_run

    _, ckpt_tp1, _ = converted["tiny-b"]
    layouts = [dict(name="tp1"), dict(name="tp2", tp=2), dict(name="pp2", pp=2, first=1)]
    out = tmp_path / "res.pt"
    run_distributed(reshard_run, 2, tiny_ckpts["tiny-b"], str(ckpt_tp1), str(tmp_path / "tp2"),
                    str(out), layouts)
    res = torch.load(out, weights_only=False)
    base = res["from_tp1/tp1"]
    assert len(res) == 6
    for name, logits in res.items():
        assert (logits - base).abs().max().item() <= 1e-5, name


def test_compare_tool_cli(converted):
    hf, ckpt, _ = converted["tiny-a"]
    cmd = [sys.executable, str(REPO / "tools/compare_hf_megatron.py"), "--hf-dir", str(hf),
           "--ckpt", str(ckpt), "--json"]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    res = json.loads(ok.stdout.strip().splitlines()[-1])
    assert res["ok"] and res["max_abs_diff"] <= 1e-4 and res["top1_agreement"] == 1.0
    strict = subprocess.run(cmd + ["--tolerance", "0"], capture_output=True, text=True, timeout=300)
    assert strict.returncode == 1 and json.loads(strict.stdout.strip().splitlines()[-1])["ok"] is False


# ------------------------------------------------------------------ bad input
def test_missing_or_foreign_directory(tmp_path, megatron_single_rank):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.hf_to_megatron(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        convert.hf_to_megatron(tmp_path / "llama", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not a megatron_latent checkpoint"):
        convert.megatron_to_hf(tmp_path / "llama", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tp_not_dividing_heads(tiny_ckpts, tmp_path):
    with pytest.raises(ValueError, match="tensor_model_parallel_size=3 does not divide"):
        convert.hf_to_megatron(tiny_ckpts["tiny-a"], tmp_path / "out", tp=3)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_overwrite(converted, tmp_path):
    hf, ckpt, _ = converted["tiny-a"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert.hf_to_megatron(hf, out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert.megatron_to_hf(ckpt, out)
    # --overwrite replaces only a previous export (tests/conversion/test_output_safety.py)
    with pytest.raises(FileExistsError, match="replaces only a previous HF export"):
        convert.megatron_to_hf(ckpt, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    convert.megatron_to_hf(ckpt, out)
    convert.megatron_to_hf(ckpt, out, overwrite=True)
    assert (out / "model.safetensors").is_file()


def test_shape_mismatch_is_named(converted, tmp_path):
    import shutil

    from safetensors.torch import save_file

    hf, _, _ = converted["tiny-b"]
    bad = tmp_path / "bad"
    shutil.copytree(hf, bad)
    t = load_file(bad / "model.safetensors")
    key = "model.layers.2.mlp.down_proj.weight"
    t[key] = t[key][:, :5].contiguous()
    save_file(t, bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"down_proj.weight.*give shape \(96, 5\)"):
        convert.hf_to_megatron(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_crash_mid_write_leaves_nothing(converted, tmp_path, monkeypatch):
    hf, _, _ = converted["tiny-a"]

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpointing, "write_metadata", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        convert.hf_to_megatron(hf, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [], "neither the output nor a temp dir may remain"


def test_reader_accepts_both_hf_layouts(converted, tmp_path):
    """A checkpoint saved with the nested (transformers 5) names reads like the released
    (transformers 4) layout: the same canonical names and the same tensors."""
    from safetensors.torch import load_file, save_file

    from megatron_latent.conversion.hf_mapping import canonical_hf_name

    hf, _, _ = converted["tiny-b"]
    released = {}
    for f in sorted(Path(hf).glob("*.safetensors")):
        released.update(load_file(f))
    nested = {canonical_hf_name(k): v for k, v in released.items()}
    assert set(nested) != set(released)  # the two layouts really differ
    save_file(nested, str(tmp_path / "model.safetensors"))
    a, b = HFCheckpointReader(hf), HFCheckpointReader(tmp_path)
    assert a.names() == b.names()
    for name in sorted(a.names()):
        assert torch.equal(a.get(name), b.get(name)), name