"""Issue 19, item 1: a converter's output never is, contains or sits inside its input, and
`--overwrite` replaces only the tool's own previous output (demo layout: run/ckpt, run/data)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from megatron_latent import checkpointing
from megatron_latent.conversion import convert

REPO = Path(__file__).resolve().parents[2]


def _cli(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(tiny_ckpts, tmp_path_factory, megatron_single_rank):
    """run/ckpt (a checkpoint with iteration 0) and run/data (records and an image)."""
    root = tmp_path_factory.mktemp("safety") / "run"
    convert.hf_to_megatron(tiny_ckpts["tiny-a"], root / "ckpt")
    (root / "data").mkdir()
    (root / "data" / "train.json").write_text("[]")
    (root / "data" / "a.png").write_bytes(b"\x89PNG not really")
    return root


@pytest.fixture
def run(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def test_export_onto_its_own_checkpoint_is_refused(run):
    before = _snapshot(run)
    main = _cli("convert_megatron_to_hf")
    with pytest.raises(ValueError, match=r"--out .*ckpt is the input .*ckpt"):
        main(["--ckpt", str(run / "ckpt"), "--out", str(run / "ckpt"), "--overwrite"])
    with pytest.raises(ValueError, match=r"--out .*run contains the input .*ckpt"):
        main(["--ckpt", str(run / "ckpt"), "--out", str(run), "--overwrite"])
    with pytest.raises(ValueError, match=r"--out .*export is inside the input .*ckpt"):
        main(["--ckpt", str(run / "ckpt"), "--out", str(run / "ckpt" / "export")])
    assert _snapshot(run) == before, "the checkpoint and the data must be untouched"


def test_import_onto_its_own_hf_dir_is_refused(run, tiny_ckpts, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_ckpts["tiny-a"], hf)
    before = _snapshot(hf)
    for out in (hf, hf.parent, hf / "mc"):
        with pytest.raises(ValueError, match="would delete the input"):
            convert.hf_to_megatron(hf, out, overwrite=True)
    assert _snapshot(hf) == before


def test_overwrite_replaces_only_the_tools_own_output(run, tiny_ckpts, tmp_path):
    ckpt = run / "ckpt"
    # a previous export / conversion is replaced
    convert.megatron_to_hf(ckpt, tmp_path / "export")
    convert.megatron_to_hf(ckpt, tmp_path / "export", overwrite=True)
    assert (tmp_path / "export" / "model.safetensors").is_file()
    convert.hf_to_megatron(tiny_ckpts["tiny-a"], tmp_path / "mc")
    convert.hf_to_megatron(tiny_ckpts["tiny-a"], tmp_path / "mc", overwrite=True)
    assert checkpointing.latest_iteration(tmp_path / "mc") == 0
    # anything else is refused, even with --overwrite: the data dir, a training checkpoint
    with pytest.raises(FileExistsError, match=r"replaces only a previous HF export.*train.json"):
        convert.megatron_to_hf(ckpt, run / "data", overwrite=True)
    assert (run / "data" / "train.json").is_file()
    shutil.copytree(ckpt / "iter_0000000", ckpt / "iter_0000010")
    (ckpt / checkpointing.LATEST).write_text("10")
    with pytest.raises(FileExistsError, match=r"previous converted checkpoint.*iter_0000010"):
        convert.hf_to_megatron(tiny_ckpts["tiny-a"], ckpt, overwrite=True)
    assert (ckpt / "iter_0000010").is_dir() and checkpointing.latest_iteration(ckpt) == 10
    with pytest.raises(FileExistsError, match="previous HF export"):
        convert.megatron_to_hf(run / "ckpt", tmp_path / "mc", overwrite=True)
    assert not list(tmp_path.glob(".*tmp*")), "no temporary directories left behind"
