"""Megatron distributed checkpoints (megatron-core dist_checkpointing, torch_dist format) plus the
metadata needed to rebuild the model, written atomically.

Layout of a checkpoint directory:
    megatron_latent.json                 model config (the HF config dict), spec, dtype, the latent
                                         method and its hyper-parameters
    hf/                                  tokenizer / processor / chat-template files (and config.json)
    latest_checkpointed_iteration.txt    the newest complete iteration (Megatron-LM's name)
    iter_0000100/                        one dist checkpoint: model [+ optimizer, rng, train state]

Tensors are stored with their global shapes, so a checkpoint loads at any TP/PP (megatron-core
reshards on load). An iteration is written to `iter_N.tmp-*` and renamed when complete, and the
`latest` file is replaced atomically after that: a crash mid-save leaves the last good one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_latent.checkpoint_verify import (CheckpointLoadError, DamagedCheckpointError,
                                              verify_iteration)
from megatron_latent.fsutil import replace_dir

META = "megatron_latent.json"
LATEST = "latest_checkpointed_iteration.txt"
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                 "preprocessor_config.json", "video_preprocessor_config.json",
                 "processor_config.json", "chat_template.json", "chat_template.jinja")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_dtype(hf_config: dict) -> torch.dtype:
    """The dtype an HF config declares (bf16 when it names none we know)."""
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "bfloat16"
    return DTYPES.get(name, torch.bfloat16)


def iter_dir(ckpt: str | Path, iteration: int) -> Path:
    return Path(ckpt) / f"iter_{iteration:07d}"


def latest_iteration(ckpt: str | Path) -> int | None:
    f = Path(ckpt) / LATEST
    if not f.is_file():
        return None
    text = f.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{f}: expected an iteration number, found {text!r}")
    return int(text)


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META).is_file() and latest_iteration(path) is not None


def iterations(ckpt: str | Path) -> list[int]:
    """The published iterations in `ckpt` (iter_NNNNNNN directories; not a crashed save's temp)."""
    return sorted(int(p.name[5:]) for p in Path(ckpt).glob("iter_*")
                  if p.is_dir() and re.fullmatch(r"iter_\d{7}", p.name))


def check_resumable(ckpt: str | Path) -> bool:
    """Whether `ckpt` holds a checkpoint to resume (False: nothing saved yet, a run may start
    afresh and save there). A directory holding iterations that cannot be resumed is an error
    naming what is missing, never a fresh start (which would save over those iterations)."""
    ckpt = Path(ckpt)
    its, latest = iterations(ckpt), latest_iteration(ckpt)
    if not its and latest is None:
        return False
    missing = []
    if not (ckpt / META).is_file():
        missing.append(f"{META} (the model config: copy it from another save of this run or "
                       "from the checkpoint the run started from)")
    if latest is None:
        missing.append(f"{LATEST} (to resume iteration N, write N into {ckpt / LATEST}; "
                       f"published iterations: {its})")
    elif latest not in its:
        missing.append(f"{iter_dir(ckpt, latest).name}, named in {LATEST} (write another of "
                       f"{its} into it to resume that one)")
    if missing:
        raise FileNotFoundError(f"--load {ckpt} holds checkpoints (iterations {its}) that cannot "
                                f"be resumed; missing: {'; '.join(missing)}. Refusing to start "
                                "over and save over them")
    return True


def write_metadata(ckpt: str | Path, hf_config: dict, spec: str, params_dtype: torch.dtype,
                   hf_side_dir: str | Path | None, *, vision_ffn_divisible_by: int,
                   latent_method: dict | None = None) -> None:
    """Rank 0 only. Copies the tokenizer/processor files so the checkpoint is self-contained.
    `vision_ffn_divisible_by`: the model's vision-MLP padding, which fixes its stored shapes.
    `latent_method`: {"name", "hparams"} (latent.registry.describe), so that generation,
    evaluation, RL and the converters rebuild the same method without flags."""
    ckpt = Path(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": 1, "model": "qwen2_5_vl", "hf_config": hf_config, "spec": spec,
            "params_dtype": str(params_dtype).removeprefix("torch."),
            "vision_ffn_divisible_by": vision_ffn_divisible_by}
    if latent_method is not None:
        meta["latent_method"] = latent_method
    _atomic_write_text(ckpt / META, json.dumps(meta, indent=2))
    if hf_side_dir is not None:
        (ckpt / "hf").mkdir(exist_ok=True)
        for name in HF_SIDE_FILES:
            src = Path(hf_side_dir) / name
            if src.is_file():
                shutil.copy2(src, ckpt / "hf" / name)


def read_metadata(ckpt: str | Path) -> dict:
    f = Path(ckpt) / META
    if not f.is_file():
        raise FileNotFoundError(f"{ckpt}: not a megatron_latent checkpoint (no {META})")
    meta = json.loads(f.read_text())
    meta["params_dtype"] = DTYPES[meta["params_dtype"]]
    return meta


def config_from_checkpoint(ckpt: str | Path, **overrides):
    """The model config stored in a checkpoint, at the layout given by `overrides` (tp, pp, ...)."""
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig

    meta = read_metadata(ckpt)
    # checkpoints written before the vision MLP was padded hold it unpadded
    kw = {"spec": meta["spec"], "params_dtype": meta["params_dtype"],
          "vision_ffn_divisible_by": meta.get("vision_ffn_divisible_by", 1), **overrides}
    return Qwen25VLConfig.from_hf(meta["hf_config"], **kw)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _broadcast_str(value: str | None) -> str:
    box = [value]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def save_state(ckpt: str | Path, iteration: int, sharded_state_dict: dict,
               keep_last: int | None = None) -> Path:
    """All ranks: write `sharded_state_dict` as iteration `iteration`, then publish it."""
    from megatron.core import dist_checkpointing

    ckpt = Path(ckpt)
    final = iter_dir(ckpt, iteration)
    tmp = _broadcast_str(str(final.with_name(final.name + f".tmp-{os.getpid()}"))
                         if _rank() == 0 else None)
    if _rank() == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
        for stale in ckpt.glob("iter_*.tmp-*"):  # left by a save that crashed
            shutil.rmtree(stale, ignore_errors=True)
        Path(tmp).mkdir()
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(sharded_state_dict, tmp)
    if dist.is_initialized():
        dist.barrier()
    if _rank() == 0:
        replace_dir(Path(tmp), final)  # re-saving an iteration (after a resume) replaces it
        _atomic_write_text(ckpt / LATEST, str(iteration))
        if keep_last:
            _prune(ckpt, keep_last)
    if dist.is_initialized():
        dist.barrier()
    return final


def _prune(ckpt: Path, keep_last: int) -> None:
    done = sorted(p for p in ckpt.glob("iter_*") if p.name[5:].isdigit())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checked(ckpt, iteration: int | None, load):
    """`load(path)` of one iteration, after verify_iteration; a failure names the iteration and
    the others that could be resumed instead."""
    it = latest_iteration(ckpt) if iteration is None else iteration
    if it is None:
        raise FileNotFoundError(f"{ckpt}: no {LATEST}; nothing to load")
    path = iter_dir(ckpt, it)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: iteration {it} named in {LATEST} is missing")
    rest = [i for i in iterations(ckpt) if i != it]
    others = (f"other iterations here: {rest} (to use one, write its number into "
              f"{Path(ckpt) / LATEST})" if rest else "no other iteration here to fall back on")
    try:
        verify_iteration(path)  # allow-listed unpickling; names a missing or truncated file
    except DamagedCheckpointError as e:
        raise DamagedCheckpointError(f"{e}; {others}") from None
    try:
        return load(str(path))
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise CheckpointLoadError(f"{path}: cannot load iteration {it} ({type(e).__name__}: "
                                  f"{str(e)[:500]}); {others}") from e


def load_state(ckpt: str | Path, sharded_state_dict: dict, iteration: int | None = None) -> dict:
    from megatron.core import dist_checkpointing

    return _load_checked(ckpt, iteration, lambda p: dist_checkpointing.load(sharded_state_dict, p))


def load_common(ckpt: str | Path, iteration: int | None = None) -> dict:
    """The non-sharded part of an iteration (train state, scheduler, ...)."""
    from megatron.core import dist_checkpointing

    return _load_checked(ckpt, iteration, dist_checkpointing.load_common_state_dict)


def tensor_keys(ckpt: str | Path, iteration: int | None = None) -> set[str]:
    """The sharded tensors' keys an iteration holds (from its metadata, no tensor is read)."""
    from megatron.core import dist_checkpointing

    return set(_load_checked(ckpt, iteration, dist_checkpointing.load_tensors_metadata))


def save_model(ckpt: str | Path, model, iteration: int = 0) -> Path:
    return save_state(ckpt, iteration, {"model": model.sharded_state_dict()})


def load_model(ckpt: str | Path, model, iteration: int | None = None) -> None:
    state = load_state(ckpt, {"model": model.sharded_state_dict()}, iteration)
    model.load_state_dict(state["model"], strict=False)
    missing = {k for k in model.state_dict() if not k.endswith("_extra_state")} - set(state["model"])
    if missing:
        raise KeyError(f"{ckpt}: checkpoint lacks {sorted(missing)[:5]}")
