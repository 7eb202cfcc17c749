"""HF <-> Megatron checkpoint conversion, built on the one name table (hf_mapping.py).

HF -> Megatron runs on tp*pp ranks (torchrun/srun, gloo on CPU); each rank builds only its part
of the model and reads only the HF tensors that part needs (safetensors are memory-mapped), then
megatron-core writes a dist checkpoint that loads at any TP/PP.
Megatron -> HF runs in one process: it loads the checkpoint at TP=PP=1 and writes HF tensors one
at a time into size-capped safetensors shards, so host memory holds the model once plus one shard.
Both write into a temporary directory beside the output and rename it when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_latent import checkpointing, parallel
from megatron_latent.fsutil import check_output, new_temp_dir, replace_dir
from megatron_latent.conversion import side_modules
from megatron_latent.conversion.hf_mapping import NameTable, legacy_hf_name
from megatron_latent.latent import registry
from megatron_latent.latent.registry import HF_METHOD_FILE
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig

SHARD_BYTES = 2 << 30  # safetensors serialises a whole shard in memory: keep it small


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _foreign_in_checkpoint(d: Path) -> list[str]:
    """What in `d` hf_to_megatron would not have written (its output: one model-only
    iteration 0)."""
    own = {checkpointing.META, checkpointing.LATEST, "hf", checkpointing.iter_dir(d, 0).name}
    bad = sorted(p.name for p in d.iterdir() if p.name not in own)
    try:
        if checkpointing.latest_iteration(d) not in (None, 0):
            bad.append(f"{checkpointing.LATEST} naming a later iteration")
    except ValueError as e:
        bad.append(str(e))
    return bad if (d / checkpointing.META).is_file() else [f"(no {checkpointing.META})", *bad]


def _foreign_in_hf_export(d: Path) -> list[str]:
    """What in `d` megatron_to_hf would not have written."""
    own = {"model.safetensors.index.json", *checkpointing.HF_SIDE_FILES, side_modules.SIDE_FILE,
           HF_METHOD_FILE}
    bad = sorted(p.name for p in d.iterdir() if not p.is_file() or not (
        p.name in own or re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", p.name)))
    return bad if (d / "config.json").is_file() else ["(no config.json)", *bad]


def check_output_dir(out: str | Path, overwrite: bool, inputs=(), kind: str = "checkpoint") -> None:
    """`kind`: "checkpoint" (hf_to_megatron's output) or "hf" (megatron_to_hf's)."""
    foreign, what = ((_foreign_in_hf_export, "HF export") if kind == "hf" else
                     (_foreign_in_checkpoint, "converted checkpoint"))
    check_output(out, inputs, overwrite, foreign, what)


@contextmanager
def atomic_output_dir(out: str | Path, check):
    """Yield a temp dir beside `out` (same filesystem); on success it replaces `out` in one
    rename. On failure nothing appears at `out`. Rank 0 creates/renames; all ranks get the path.
    `check()` vets `out` once more (a directory may have appeared since the first check)."""
    out = Path(out).resolve()
    check()
    box = [str(new_temp_dir(out)) if _rank0() else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    tmp = Path(box[0])
    try:
        yield tmp
        if dist.is_initialized():
            dist.barrier()
        if _rank0():
            replace_dir(tmp, out)
    finally:
        if _rank0() and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def hf_to_megatron(hf_dir: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1,
                   spec: str = "local", params_dtype: torch.dtype | None = None,
                   overwrite: bool = False) -> None:
    """Call on every rank of a world of exactly tp * pp processes (or one process)."""
    from megatron_latent.conversion.hf_load import load_hf_weights

    hf_dir = Path(hf_dir)
    hf_config = json.loads(_config_path(hf_dir).read_text())
    dtype = params_dtype or checkpointing.hf_dtype(hf_config)
    # validate everything before starting processes groups or writing anything
    Qwen25VLConfig.from_hf(_config_path(hf_dir), tensor_model_parallel_size=tp,
                           pipeline_model_parallel_size=pp, spec=spec)
    check = lambda: check_output_dir(out, overwrite, [hf_dir], "checkpoint")  # noqa: E731
    check()
    parallel.initialize(parallel.ParallelConfig(tp, pp))
    if dist.get_world_size() != tp * pp:
        raise ValueError(f"run the conversion on exactly tp*pp = {tp * pp} processes "
                         f"(got {dist.get_world_size()})")
    cfg = Qwen25VLConfig.from_hf(hf_config, tensor_model_parallel_size=tp,
                                 pipeline_model_parallel_size=pp, spec=spec, params_dtype=dtype)
    # the method the HF dir was exported or released with (none: a plain Qwen2.5-VL)
    record = registry.record_for(hf_dir) or {"name": "none", "hparams": {}}
    method, model = _model_with_method(cfg, record, hf_dir)
    load_hf_weights(model, hf_dir, progress=_rank0(), latent_method=method)
    with atomic_output_dir(out, check) as tmp:
        checkpointing.save_model(tmp, model, iteration=0)
        if _rank0():
            checkpointing.write_metadata(tmp, hf_config, spec, dtype, hf_dir,
                                         vision_ffn_divisible_by=cfg.vision_ffn_divisible_by,
                                         latent_method=registry.describe(method))


def _model_with_method(cfg, record: dict, tokenizer_dir):
    """(method, model with the method's side modules on this stage)."""
    from transformers import AutoTokenizer

    from megatron_latent.models.qwen25vl.model import Qwen25VLModel
    from megatron.core import parallel_state as ps

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    method = registry.from_record(record, tokenizer, cfg)
    modules = method.build_modules(cfg, pre_process=ps.is_pipeline_first_stage(),
                                   post_process=ps.is_pipeline_last_stage())
    return method, Qwen25VLModel(cfg, latent_modules=modules)


def megatron_to_hf(ckpt: str | Path, out: str | Path, *, overwrite: bool = False,
                   shard_bytes: int = SHARD_BYTES) -> None:
    """One process. Writes config, tokenizer/processor files and sharded safetensors."""
    from safetensors.torch import save_file

    from megatron_latent.conversion.hf_load import global_parameter_names

    meta = checkpointing.read_metadata(ckpt)
    check = lambda: check_output_dir(out, overwrite, [ckpt], "hf")  # noqa: E731
    check()
    parallel.initialize(parallel.ParallelConfig())
    cfg = checkpointing.config_from_checkpoint(ckpt)
    record = registry.checkpoint_record(meta)
    method, model = _model_with_method(cfg, record, Path(ckpt) / "hf")
    checkpointing.load_model(ckpt, model)
    table = NameTable(cfg)
    params = model.state_dict()
    names = [(n, g) for n, g in global_parameter_names(model).items()
             if not n.endswith("_extra_state") and not n.startswith(side_modules.PREFIX)
             and not (cfg.tie_word_embeddings and g == "language_model.output_layer.weight")]
    with atomic_output_dir(out, check) as tmp:
        weight_map, shard, shard_size, shard_files = {}, {}, 0, []

        def flush():
            nonlocal shard, shard_size
            if shard:
                name = f"model-{len(shard_files) + 1:05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                shard_files.append(name)
                weight_map.update({k: name for k in shard})
                shard, shard_size = {}, 0

        for local, global_name in tqdm(names, desc="megatron -> hf", unit="tensor"):
            hf_names, transform = table.lookup(global_name)
            for hf_name, t in zip(hf_names, transform.to_hf(params[local])):
                t = t.contiguous().clone()
                if shard_size + t.numel() * t.element_size() > shard_bytes:
                    flush()
                shard[legacy_hf_name(hf_name)] = t
                shard_size += t.numel() * t.element_size()
        flush()
        _finish_hf_dir(tmp, shard_files, weight_map, meta, ckpt)
        # the method (and its modules, which HF's Qwen2.5-VL has no place for) beside the files
        side = side_modules.side_parameters(model)
        if side:
            save_file({k: v.contiguous() for k, v in side.items()},
                      tmp / side_modules.SIDE_FILE, metadata={"format": "pt"})
        (tmp / HF_METHOD_FILE).write_text(json.dumps(registry.describe(method), indent=2))
        extra = method.hf_config_keys()
        if extra:
            config = json.loads((tmp / "config.json").read_text())
            (tmp / "config.json").write_text(json.dumps({**config, **extra}, indent=2))


def _finish_hf_dir(tmp: Path, shard_files: list[str], weight_map: dict, meta: dict, ckpt) -> None:
    n = len(shard_files)
    renamed = {}
    for i, name in enumerate(shard_files):  # HF's naming: model-00001-of-0000N.safetensors
        new = f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
        os.rename(tmp / name, tmp / new)
        renamed[name] = new
    if n > 1:
        total = sum((tmp / f).stat().st_size for f in renamed.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    side = Path(ckpt) / "hf"
    for f in checkpointing.HF_SIDE_FILES:
        if (side / f).is_file() and f != "config.json":
            shutil.copy2(side / f, tmp / f)
    hf_config = dict(meta["hf_config"])
    hf_config["dtype"] = str(meta["params_dtype"]).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))


def _config_path(hf_dir: Path) -> Path:
    p = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir}: HF checkpoint directory does not exist")
    if not p.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json; not an HF checkpoint directory")
    return p


