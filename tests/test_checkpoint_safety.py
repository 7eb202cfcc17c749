"""Issue 19, items 9 and 10: a damaged checkpoint file is named (truncated .distcp, .metadata,
.safetensors), and loading a checkpoint runs no code a crafted pickle brings (the dist-checkpoint
index and ShardedObjects are read through an allow-list / torch.load(weights_only=True))."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest

from megatron_latent import checkpointing
from megatron_latent.conversion import convert


class Payload:
    """What an attacker pickles: unpickling it runs a shell command (here: touch a marker)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def converted(tiny_ckpts, tmp_path_factory, megatron_single_rank):
    out = tmp_path_factory.mktemp("trust") / "ckpt"
    convert.hf_to_megatron(tiny_ckpts["tiny-a"], out)
    return out


@pytest.fixture
def ckpt(converted, tmp_path):
    shutil.copytree(converted, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _load(ckpt):
    from megatron_latent.models.qwen25vl.model import Qwen25VLModel

    checkpointing.load_model(ckpt, Qwen25VLModel(checkpointing.config_from_checkpoint(ckpt)))


# ------------------------------------------------------------------ item 9
@pytest.mark.parametrize("name, size", [("__0_0.distcp", 5000), (".metadata", 100)])
def test_a_truncated_checkpoint_file_is_named(ckpt, name, size):
    f = ckpt / "iter_0000000" / name
    os.truncate(f, size)
    with pytest.raises(BaseException) as err:  # torch's CheckpointException is a BaseException
        _load(ckpt)
    assert str(f) in str(err.value) and ("truncated" in str(err.value))


def test_a_truncated_safetensors_file_is_named(tiny_ckpts, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_ckpts["tiny-a"], hf)
    os.truncate(hf / "model.safetensors", 10_000)
    with pytest.raises(Exception) as err:
        convert.hf_to_megatron(hf, tmp_path / "out")
    assert f"{hf / 'model.safetensors'}: unreadable safetensors file" in str(err.value)
    assert "truncated" in str(err.value)


# ------------------------------------------------------------------ item 10
def test_a_crafted_index_runs_nothing_at_generation_load(ckpt, tmp_path):
    from megatron_latent.inference.loading import load_for_generation

    marker = tmp_path / "pwned"
    (ckpt / "iter_0000000" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(BaseException) as err:
        load_for_generation(ckpt)  # what tools/generate.py --ckpt calls
    assert not marker.exists(), "the checkpoint ran a command"
    assert "refers to posix.system" in str(err.value) and "trust" in str(err.value)


def test_a_crafted_sharded_object_runs_nothing(tmp_path, megatron_single_rank):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    marker = tmp_path / "pwned"
    checkpointing.save_state(tmp_path / "c", 1, {"rng": ShardedObject(
        "rng_state", [Payload(marker)], (1,), (0,), replica_id=0)})
    with pytest.raises(BaseException) as err:
        checkpointing.load_state(tmp_path / "c", {"rng": ShardedObject(
            "rng_state", None, (1,), (0,), replica_id=0)})
    assert not marker.exists(), "the checkpoint ran a command"
    assert "rng_state" in str(err.value) and "weights_only=True" in str(err.value)
    assert "posix.system" in str(err.value)
