"""Cache a DeepLatent stage-1 model's teacher visual states (spec 2.4) for stage 2's alignment:
a forward-only pass over the stage-1 dataset (data/deeplatent_data.py, stage 1), keeping the
decoder-layer outputs at the pad slots of the assistant images (`teacher_mask`).

    torchrun --nproc-per-node 8 tools/cache_teacher_states.py --ckpt STAGE1 --data D \\
        --out DIR --layers 7,14,21,28

Writes DIR/teacher/{shard:05d}.safetensors (tensor "{sample_id}/L{l}" [sum_k H_k*W_k, hidden],
--cache-dtype, default bf16; samples without assistant images get none), DIR/teacher/index.json
({sample_id: {shard, grids, layers, model_hash}}, every sample, written when every shard is
done) and
DIR/teacher/manifest.json (the run's settings). Read it with latent.teacher.TeacherCache.

- Data-parallel: shard k (samples [k*S, (k+1)*S) in dataset order) belongs to DP rank k % dp;
  TP ranks of a group compute together, TP rank 0 writes. PP is not supported (--pp 1).
- Before starting it prints the disk space it needs (slots x layers x hidden x bytes) and
  refuses if the filesystem has less free.
- Shards are written to a temp file and renamed; a shard's metadata names its samples. A rerun
  after a kill skips the finished shards and discards temp files and unreadable shards.
- It never mixes models: a cache whose manifest names another model hash is an error.
- --ckpt: a megatron_latent checkpoint or an HF directory; its hash (model_hash) is sha256
  over each weight file's name, size, first and last MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_latent.platform.quiet import quiet_known_warnings  # noqa: E402
quiet_known_warnings()

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MIB = 1 << 20


# ---------------------------------------------------------------------- identity and layout
def model_hash(path) -> str:
    from megatron_latent import checkpointing

    path = Path(path)
    if checkpointing.is_checkpoint(path):
        it = checkpointing.latest_iteration(path)
        root = checkpointing.iter_dir(path, it)
        files = sorted(p for p in root.rglob("*") if p.is_file())
    else:
        files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
        root = path
    if not files:
        raise FileNotFoundError(f"{path}: no weight files to identify the model by")
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(root)}:{size}\n".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(MIB))
            fh.seek(max(0, size - MIB))
            h.update(fh.read(MIB))
    return h.hexdigest()[:16]


def _size(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1000:
            return f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.2f} TB"


def shard_path(d: Path, k: int) -> Path:
    return d / f"{k:05d}.safetensors"


def grids_of(dataset, i: int) -> list:
    """Teacher grids of sample i: `dataset.teacher_grids(i)` when it has that (cheap), else
    the sample's own (one load), else a collated one-sample micro-batch's."""
    if hasattr(dataset, "teacher_grids"):
        return [tuple(g) for g in dataset.teacher_grids(i)]
    sample = dataset[i]
    grids = sample.get("teacher_grids") if isinstance(sample, dict) else None
    if grids is None:
        grids = dataset.collate([sample])["teacher_grids"][0]
    return [tuple(g) for g in grids]


def read_shard_meta(path: Path) -> dict | None:
    """A finished shard's metadata, None if the file is unreadable (half-written, damaged)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["teacher"])
    except Exception:  # any unreadable file is treated as not written
        return None


def write_shard(d: Path, k: int, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    tmp = d / f".{k:05d}.safetensors.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"teacher": json.dumps(meta)})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, shard_path(d, k))


def check_manifest(d: Path, manifest: dict) -> None:
    """Create the manifest, or check an existing cache's against this run's."""
    from megatron_latent.fsutil import write_text_atomic

    path = d / "manifest.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("model_hash") != manifest["model_hash"]:
            raise ValueError(f"{d} holds teacher states of model {old.get('model_hash')}, not of "
                             f"this checkpoint ({manifest['model_hash']}); refusing to mix or "
                             "overwrite them: choose another --out")
        diff = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{d}: this run's settings differ from the cache's (old, new): "
                             f"{diff}; use the same ones to resume, or another --out")
        return
    if any(p.name.endswith(".safetensors") or p.name == "index.json" for p in d.iterdir()):
        raise ValueError(f"{d} holds teacher files without a manifest (another tool's?); "
                         "refusing to overwrite them: choose another --out")
    write_text_atomic(path, json.dumps(manifest, indent=1) + "\n")


# ---------------------------------------------------------------------- the run
class Progress:
    def __init__(self, enabled: bool, total: int, every: float = 10.0):
        self.enabled, self.total, self.every = enabled, total, every
        self.start = self.last = time.monotonic()

    def __call__(self, done: int, samples: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < self.every and done < self.total):
            return
        self.last, spent = now, now - self.start
        eta = spent / done * (self.total - done) if done else float("nan")
        print(f"[teacher] shard {done}/{self.total} of this rank ({samples} samples), "
              f"{spent:.0f} s, ETA {eta:.0f} s", flush=True)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _layout() -> tuple[int, int, bool]:
    """(data-parallel rank, size, whether this rank writes)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1, True
    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("the teacher cache runs at PP = 1 (use TP and data parallelism)")
    return (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
            ps.get_tensor_model_parallel_rank() == 0)


def _barrier() -> None:
    if (d := _dist()) is not None:
        d.barrier()


def _raise_any(error: Exception | None) -> None:
    """Every rank raises the first rank's error, if any rank has one (none waits forever)."""
    errors = [error]
    if (d := _dist()) is not None:
        errors = [None] * d.get_world_size()
        d.all_gather_object(errors, None if error is None else (type(error), str(error)))
        errors = [e if e is None else e[0](e[1]) for e in errors]
    for e in errors:
        if e is not None:
            raise e


def write_cache(model, dataset, out, layers, *, model_hash: str, hidden_size: int,
                shard_samples: int = 64, micro_batch_size: int = 1, dtype=torch.bfloat16,
                forward_only=None, free_bytes=None, on_shard=None, progress: bool = True) -> dict:
    """All ranks: cache `dataset`'s teacher states into `out`/teacher (see the module doc).
    `on_shard(k)` runs after shard k is written; `free_bytes(dir)` defaults to the disk's.
    Returns {"shards_done", "shards_written", "bytes_needed"} of this rank."""
    from megatron_latent.fsutil import write_text_atomic
    from megatron_latent.latent.teacher import capture_many

    layers = sorted(int(x) for x in layers)
    d = Path(out) / "teacher"
    dp_rank, dp_size, writer = _layout()
    rank0 = writer and dp_rank == 0
    n = len(dataset)
    n_shards = -(-n // shard_samples)
    manifest = {"model_hash": model_hash, "layers": layers, "dtype": str(dtype).split(".")[-1],
                "hidden_size": hidden_size, "shard_samples": shard_samples, "num_samples": n}
    error = None
    if rank0:
        try:
            d.mkdir(parents=True, exist_ok=True)
            check_manifest(d, manifest)
            for p in d.glob(".*.safetensors.tmp-*"):  # a killed run's half-written shards
                p.unlink()
        except (ValueError, OSError) as e:
            error = e
    _raise_any(error)
    mine = [k for k in range(n_shards) if k % dp_size == dp_rank]
    plan = {k: list(range(k * shard_samples, min(n, (k + 1) * shard_samples))) for k in mine}
    todo, error = [], None
    for k in mine:
        meta = read_shard_meta(shard_path(d, k)) if shard_path(d, k).is_file() else None
        if meta is not None and meta["indices"] == plan[k] and meta["layers"] == layers \
                and meta["model_hash"] == model_hash:
            continue
        if meta is not None:
            error = ValueError(f"{shard_path(d, k)} holds other samples, layers or model than "
                               "this run plans; refusing to overwrite it")
        elif writer and shard_path(d, k).exists():
            shard_path(d, k).unlink()  # unreadable: discarded
        todo.append(k)
    _raise_any(error)
    grids = {i: grids_of(dataset, i) for k in todo for i in plan[k]} if writer else {}
    itemsize = torch.empty((), dtype=dtype).element_size()
    slots = sum(h * w for g in grids.values() for h, w in g)
    need = slots * len(layers) * hidden_size * itemsize
    total = torch.tensor([slots, len(todo) if writer else 0], dtype=torch.float64)
    if (dist := _dist()) is not None:  # on the collective's device (NCCL has no CPU tensors)
        from megatron_latent import parallel

        total = total.to(parallel.device())
        dist.all_reduce(total)
    slots_all, todo_all = int(total[0]), int(total[1])
    need_all = slots_all * len(layers) * hidden_size * itemsize
    free = (free_bytes or (lambda p: shutil.disk_usage(p).free))(d)
    if rank0 and progress:
        print(f"[teacher] {n} samples in {n_shards} shards, {n_shards - todo_all} done, "
              f"{todo_all} to do: {slots_all} slots x {len(layers)} layers x {hidden_size} x "
              f"{itemsize} B = {_size(need_all)} needed, {_size(free)} free in {d}", flush=True)
    if need_all > free:
        raise OSError(f"{d}: the cache needs {_size(need_all)}, only {_size(free)} free")
    show, n_done = Progress(progress and rank0, len(mine)), 0
    show(len(mine) - len(todo), 0)
    for k in todo:
        tensors, samples = {}, {}
        for j in range(0, len(plan[k]), micro_batch_size):
            idx = plan[k][j:j + micro_batch_size]
            mb = dataset.collate([dataset[i] for i in idx])
            states = (capture_many(model, [mb], layers, forward_only=forward_only)[0]
                      if mb["teacher_mask"].any() else {})
            off = 0
            for sid, g in zip(mb["sample_ids"], mb["teacher_grids"]):
                g = [tuple(int(v) for v in hw) for hw in g]
                rows = sum(h * w for h, w in g)
                samples[sid] = g
                if rows:
                    for layer in layers:
                        t = states[layer][off:off + rows]
                        tensors[f"{sid}/L{layer}"] = t.to("cpu", dtype).contiguous()
                off += rows
            if off != int(mb["teacher_mask"].sum()):
                raise ValueError(f"samples {idx}: teacher_grids give {off} slots, teacher_mask "
                                 f"{int(mb['teacher_mask'].sum())}")
        if writer:
            write_shard(d, k, tensors, {"shard": k, "indices": plan[k], "samples": samples,
                                        "layers": layers, "model_hash": model_hash})
        if on_shard is not None:
            on_shard(k)
        n_done += len(plan[k])
        show(len(mine) - len(todo) + todo.index(k) + 1, n_done)
    _barrier()
    if rank0:
        index = {}
        for k in range(n_shards):
            meta = read_shard_meta(shard_path(d, k))
            if meta is None:
                raise RuntimeError(f"{shard_path(d, k)} missing after the run")
            for sid, g in meta["samples"].items():  # grids []: no assistant image, no tensor
                index[sid] = {"shard": k, "grids": g, "layers": layers, "model_hash": model_hash}
        write_text_atomic(d / "index.json", json.dumps(index) + "\n")
        if progress:
            n_states = sum(1 for e in index.values() if e["grids"])
            print(f"[teacher] done: {len(index)} samples, {n_states} with teacher states, in "
                  f"{d}", flush=True)
    _barrier()
    return {"shards_done": len(mine) - len(todo), "shards_written": len(todo),
            "bytes_needed": need}


# ---------------------------------------------------------------------- command line
def open_dataset(data, processor, cfg, method, args):
    """The stage-1 DeepLatent dataset of `data` (micro-batches with `sample_ids`,
    `teacher_mask`, `teacher_grids`); the latent tokens are added to the tokenizer if the
    checkpoint's method did not (an HF stage-1 export)."""
    from megatron_latent.data.deeplatent_data import MAX_BLOCKS, DeepLatentDataset
    from megatron_latent.data.deeplatent_tokens import LATENT_TOKENS
    from megatron_latent.latent.tokens import add_tokens

    add_tokens(processor.tokenizer, LATENT_TOKENS, cfg.vocab_size, special=False)
    pixels = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels))
              if v is not None}
    return DeepLatentDataset(data, stage=1, tokenizer=processor.tokenizer,
                             image_processor=processor.image_processor, vocab_size=cfg.vocab_size,
                             seq_length=args.seq_length, skip_bad=args.skip_bad,
                             max_blocks=getattr(method, "max_blocks", MAX_BLOCKS), **pixels)


def main(argv=None) -> int:
    from megatron_latent.inference.loading import add_model_args

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", required=True, help="the stage-1 dataset")
    p.add_argument("--out", required=True, help="writes OUT/teacher/")
    p.add_argument("--layers", default="7,14,21,28", help="1-based decoder layers")
    p.add_argument("--latent-method", default=None, help="default: the checkpoint's own")
    p.add_argument("--cache-dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--shard-samples", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=None, help="as in stage-1 training")
    p.add_argument("--min-pixels", type=int, default=None, help="question images")
    p.add_argument("--max-pixels", type=int, default=None, help="question images")
    p.add_argument("--skip-bad", action="store_true", help="leave out rows the data cannot use")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.pp != 1:
        p.error("--pp must be 1 (use --tp and data parallelism)")
    layers = [int(x) for x in a.layers.split(",") if x.strip()]

    from megatron_latent import parallel
    from megatron_latent.inference.loading import load_for_generation

    parallel.initialize(parallel.ParallelConfig(a.tp, 1))
    try:
        model, processor, cfg, method = load_for_generation(
            a.ckpt, tp=a.tp, pp=1, spec=a.spec, dtype=a.dtype, latent_method=a.latent_method)
        bad = [x for x in layers if not 1 <= x <= cfg.num_layers]
        if bad:
            raise ValueError(f"--layers {bad}: the model has layers 1..{cfg.num_layers}")
        ds = open_dataset(a.data, processor, cfg, method, a)
        write_cache(model, ds, a.out, layers, model_hash=model_hash(a.ckpt),
                    hidden_size=cfg.hidden_size, shard_samples=a.shard_samples,
                    micro_batch_size=a.micro_batch_size, dtype=DTYPES[a.cache_dtype],
                    progress=not a.quiet)
    except (ValueError, FileNotFoundError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
