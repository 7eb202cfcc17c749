"""Issue 19, items 2, 3, 6, 7, 8 and 9 (schedule) through the SFT trainer, in this process (world
size 1, the tiny model): an unresumable --load directory is an error, never a fresh start over
its iterations; a changed data file, batch size or seed is refused unless overridden; a changed
--lr takes effect; an empty records file, a bad warmup and a truncated image (with
--skip-bad-samples) are handled before or without a crash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_latent import checkpointing
from megatron_latent.data.errors import DataError
from megatron_latent.training.build import OptimSettings
from megatron_latent.training.trainer import TrainConfig, train

BASE = dict(micro_batch_size=2, global_batch_size=2, seq_length=512, min_pixels=3136,
            max_pixels=50176, lr_decay_style="constant", latent_method="lvr",
            wandb_mode="disabled", seed=7)


def run(data, hf, lr=1e-3, **kw):
    return train(TrainConfig(data_path=str(data), hf_dir=hf, optim=OptimSettings(lr=lr),
                             **{**BASE, **kw}))


def listing(ckpt: Path) -> dict:
    return {p.name: p.read_text() if p.is_file() else None for p in sorted(ckpt.iterdir())}


@pytest.fixture(scope="module")
def saved(tiny_ckpts, synthetic_lvr, tmp_path_factory):
    """A run of 2 iterations, checkpointed at both."""
    ckpt = tmp_path_factory.mktemp("resume") / "ckpt"
    run(synthetic_lvr / "meta.json", tiny_ckpts["tiny-a"], train_iters=2, save=str(ckpt),
        save_interval=1)
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000001", "iter_0000002"]
    return ckpt


@pytest.fixture
def ckpt(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def resume(ckpt, data, hf, **kw):
    kw.setdefault("train_iters", 3)
    return run(data, hf, load=str(ckpt), save=str(ckpt), **kw)


# ------------------------------------------------------------------ item 2
@pytest.mark.parametrize("damage", ["no latest", "no metadata", "latest names a missing one"])
def test_unresumable_load_dir_is_an_error_not_a_fresh_start(ckpt, damage, synthetic_lvr,
                                                            tiny_ckpts):
    if damage == "no latest":
        (ckpt / checkpointing.LATEST).unlink()
        want = r"missing: latest_checkpointed_iteration.txt \(to resume iteration N, write N into"
    elif damage == "no metadata":
        (ckpt / checkpointing.META).unlink()
        want = r"missing: megatron_latent.json \(the model config"
    else:
        shutil.rmtree(ckpt / "iter_0000002")
        want = r"missing: iter_0000002, named in latest_checkpointed_iteration.txt"
    before = listing(ckpt)
    with pytest.raises(FileNotFoundError, match=rf"holds checkpoints \(iterations \[1(, 2)?\]\) "
                                                rf"that cannot be resumed; {want}"):
        resume(ckpt, synthetic_lvr / "meta.json", tiny_ckpts["tiny-a"])
    assert listing(ckpt) == before, "nothing may be saved over the iterations"


# ------------------------------------------------------------------ item 6
def test_changed_data_batch_or_seed_is_refused_unless_overridden(ckpt, synthetic_lvr,
                                                                 tiny_ckpts, tmp_path, capsys):
    hf, data = tiny_ckpts["tiny-a"], synthetic_lvr / "meta.json"
    before = listing(ckpt)
    for change, want in ((dict(data=synthetic_lvr / "meta_val.json"), "the data .*meta_val.json"
                          r".*--override-data-path"),
                         (dict(global_batch_size=4), r"--global-batch-size was 2, now 4 .*"
                          r"--override-global-batch-size"),
                         (dict(seed=8), r"--seed was 7, now 8 .*--override-seed")):
        kw = {"data": data, **change}
        with pytest.raises(ValueError, match="differs from the run that saved the checkpoint: "
                                             + want):
            resume(ckpt, kw.pop("data"), hf, **kw)
        assert listing(ckpt) == before
    moved = tmp_path / "moved"
    shutil.copytree(synthetic_lvr, moved)  # the same data elsewhere is no change
    resume(ckpt, moved / "meta.json", hf, train_iters=3)
    assert "the data moved" in capsys.readouterr().out
    resume(ckpt, synthetic_lvr / "meta_val.json", hf, train_iters=4, seed=8,
           resume_overrides=("data_path", "seed"))
    out = capsys.readouterr().out
    assert "--override-data-path: the data (--data-path) changed" in out
    assert "--override-seed: --seed changed from 7 to 8" in out
    from megatron_latent.training.state import saved_train_state

    args = saved_train_state(ckpt)["run_args"]
    assert args["seed"] == 8 and args["data_path"].endswith("meta_val.json")


# ------------------------------------------------------------------ item 8
def _llm_params(ckpt, iteration) -> dict:
    from megatron_latent.training.build import build_model

    model = build_model(checkpointing.config_from_checkpoint(ckpt), wrap_ddp=False)[0]
    checkpointing.load_model(ckpt, model, iteration)
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.startswith("language_model") and not k.endswith("_extra_state")}


def test_a_changed_lr_on_resume_takes_effect(saved, tmp_path, synthetic_lvr, tiny_ckpts):
    """Adam's step is linear in the LR: from the same checkpoint, the resumed step at lr 0.5
    moves every weight 500 times as far as the step at the saved lr 1e-3."""
    hf, data = tiny_ckpts["tiny-a"], synthetic_lvr / "meta.json"
    moves = {}
    for lr in (1e-3, 0.5):
        ck = tmp_path / f"lr{lr}"
        shutil.copytree(saved, ck)
        hist = resume(ck, data, hf, lr=lr)
        assert [h["iteration"] for h in hist] == [3] and hist[0]["lr"] == lr
        start, end = _llm_params(ck, 2), _llm_params(ck, 3)
        moves[lr] = {k: end[k] - start[k] for k in start}
    for k, ref in moves[1e-3].items():
        # allowed: 0.1% plus the fp32 rounding of the small move (2 ulps of the weight) x 500
        bound = 1e-3 * (500 * ref).abs() + 500 * 2.4e-7 * start[k].abs()
        assert ((moves[0.5][k] - 500 * ref).abs() <= bound).all(), k
    assert sum(float(m.abs().sum()) for m in moves[1e-3].values()) > 0


def test_a_changed_optimizer_layout_names_the_flag(ckpt, synthetic_lvr, tiny_ckpts):
    with pytest.raises(ValueError, match=r"parameter groups changed \(freeze_vision was True, "
                                         r"now False\).*--pretrained-checkpoint"):
        resume(ckpt, synthetic_lvr / "meta.json", tiny_ckpts["tiny-a"], freeze_vision=False)


# ------------------------------------------------------------------ items 7 and 9
def test_warmup_as_long_as_the_run_is_named(synthetic_lvr, tiny_ckpts):
    with pytest.raises(ValueError, match=r"--lr-warmup-iters \(3\) must be at least 0 and "
                                         r"smaller than --train-iters \(3\)"):
        run(synthetic_lvr / "meta.json", tiny_ckpts["tiny-a"], train_iters=3, lr_warmup_iters=3)


def test_empty_records_file_fails_before_the_model_is_built(tmp_path, tiny_ckpts):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match=r"empty.json: \(whole file\): no records"):
        run(tmp_path / "empty.json", tiny_ckpts["tiny-a"], train_iters=2)


# ------------------------------------------------------------------ item 3
def test_skip_bad_samples_survives_an_image_truncated_after_its_header(tmp_path, synthetic_lvr,
                                                                       tiny_ckpts):
    records = json.loads((synthetic_lvr / "train.json").read_text())[:4]
    images = tmp_path / "images"
    shutil.copytree(synthetic_lvr / "images", images)
    bad = images / records[1]["image"]
    bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])
    (images / "train.json").write_text(json.dumps(records))  # image paths: relative to images/
    hist = run(images / "train.json", tiny_ckpts["tiny-a"], train_iters=2, global_batch_size=4,
               skip_bad_samples=True)
    assert [h["iteration"] for h in hist] == [1, 2]


# ------------------------------------------------------------------ item 5, flags
def test_images_outside_their_folder_need_the_flag(tmp_path, synthetic_lvr, tiny_ckpts):
    records = json.loads((synthetic_lvr / "train.json").read_text())[:2]
    for r in records:
        r["image"] = str(synthetic_lvr / "images" / r["image"])  # absolute, elsewhere
    (tmp_path / "train.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"train.json: record 0: field 'image\[0\]'.*leaves the "
                                        r"image folder"):
        run(tmp_path / "train.json", tiny_ckpts["tiny-a"], train_iters=1)
    hist = run(tmp_path / "train.json", tiny_ckpts["tiny-a"], train_iters=1,
               allow_images_outside_folder=True)
    assert [h["iteration"] for h in hist] == [1]


def test_override_flags_reach_the_config():
    import argparse

    from megatron_latent.training.cli import add_common_args, common_config

    p = argparse.ArgumentParser()
    add_common_args(p, lr=1e-5, decay="cosine")
    base = ["--data-path", "d.json", "--train-iters", "1"]
    assert common_config(p.parse_args(base))["resume_overrides"] == ()
    cfg = common_config(p.parse_args(base + ["--override-data-path", "--override-seed",
                                             "--override-global-batch-size",
                                             "--allow-images-outside-folder"]))
    assert set(cfg["resume_overrides"]) == {"data_path", "seed", "batch"}
    assert cfg["allow_images_outside_folder"] is True
