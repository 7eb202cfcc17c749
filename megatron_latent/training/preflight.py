"""Checks made before a run builds anything: the LR schedule is valid, and a resumed run still
matches what its checkpoint recorded (data, batch size, seed, optimizer layout).

Every save records `run_args(cfg)` in the train state. On resume, a different data file, batch
size or seed would silently change the sample order the checkpoint's data position counts in,
so it is refused unless the user says `--override-data-path` / `--override-global-batch-size` /
`--override-seed` (then it is logged, and the next save records the new value). LR, warmup,
decay and weight decay may change freely: the command line's schedule wins (logged)."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

BATCH = ("global_batch_size", "prompts_per_step", "group_size")  # SFT's, RL's
SCHEDULE = ("lr", "min_lr", "weight_decay", "train_iters", "lr_warmup_iters", "lr_decay_style")
GROUPS = ("vision_lr", "merger_lr", "freeze_vision", "freeze_merger")  # the optimizer's groups
OVERRIDES = {"data_path": "--override-data-path", "batch": "--override-global-batch-size",
             "seed": "--override-seed"}


def check_schedule(train_iters: int, warmup_iters: int) -> None:
    if train_iters < 1:
        raise ValueError(f"--train-iters must be at least 1, got {train_iters}")
    if not 0 <= warmup_iters < train_iters:
        raise ValueError(f"--lr-warmup-iters ({warmup_iters}) must be at least 0 and smaller "
                         f"than --train-iters ({train_iters}): the LR decays after the warmup")


@lru_cache(maxsize=8)
def _fingerprint(path: str, size: int, mtime_ns: int) -> str:
    """Size and the hash of the first and last MiB of a file, plus the same for the records
    files a (small) meta JSON lists: cheap for huge records files, independent of where the
    data lives (a moved dataset keeps its fingerprint)."""
    from megatron_latent.data.llava_records import _is_meta

    h, files = hashlib.sha256(), [Path(path)]
    if size <= 1 << 20:
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            obj = None
        if _is_meta(obj):
            entries = obj.values() if isinstance(obj, dict) else obj
            files += [Path(path).parent / e["data_path"] for e in entries
                      if isinstance(e, dict) and isinstance(e.get("data_path"), str)]
    for f in files:
        try:
            with open(f, "rb") as fh:
                n = fh.seek(0, 2)
                fh.seek(0)
                head = fh.read(1 << 20)
                fh.seek(max(0, n - (1 << 20)))
                h.update(f"{n}:".encode() + head + fh.read())
        except OSError:
            h.update(b"missing:" + str(f.name).encode())
    return h.hexdigest()[:16]


def data_fingerprint(path) -> str:
    st = Path(path).stat()
    return _fingerprint(str(Path(path).absolute()), st.st_size, st.st_mtime_ns)


def run_args(cfg) -> dict:
    """What a checkpoint records about the run that wrote it (plain values: they are reloaded
    with torch.load(weights_only=True))."""
    optim = cfg.optim
    out = {"data_path": str(Path(cfg.data_path).absolute()),
           "data_fingerprint": data_fingerprint(cfg.data_path), "seed": cfg.seed,
           **{k: getattr(cfg, k) for k in BATCH if hasattr(cfg, k)},
           **{k: getattr(cfg, k, getattr(optim, k, None)) for k in SCHEDULE + GROUPS}}
    return {k: v for k, v in out.items() if v is None or isinstance(v, (str, int, float, bool))}


def check_resume(cfg, saved: dict | None, overrides=()) -> list[str]:
    """Compare the command line with a checkpoint's `run_args`; raise on a mismatch the user
    did not override. -> notes to print (overridden or changed values)."""
    if not saved:
        return [f"--load {cfg.load}: the checkpoint records no run arguments (written before "
                "they were recorded); data, batch size and seed are not checked"]
    now, notes, refused = run_args(cfg), [], []

    def changed(name, old, new, key):
        if key in overrides:
            notes.append(f"{OVERRIDES[key]}: {name} changed from {old!r} to {new!r}")
        else:
            refused.append(f"{name} was {old!r}, now {new!r} (pass {OVERRIDES[key]} to resume "
                           "anyway)")

    if saved.get("data_fingerprint") != now["data_fingerprint"]:
        changed("the data (--data-path)", saved.get("data_path"), now["data_path"], "data_path")
    elif saved.get("data_path") != now["data_path"]:
        notes.append(f"the data moved: {saved.get('data_path')} -> {now['data_path']} (same "
                     "content)")
    for k in BATCH:
        if k in saved and saved[k] != now.get(k):
            changed(f"--{k.replace('_', '-')}", saved[k], now.get(k), "batch")
    if saved.get("seed") != now["seed"]:
        changed("--seed", saved.get("seed"), now["seed"], "seed")
    groups = [f"{k} was {saved[k]!r}, now {now[k]!r}" for k in GROUPS
              if k in saved and saved[k] != now[k] and (k.startswith("freeze") or
                                                        None in (saved[k], now[k]))]
    if groups:
        refused.append(f"the optimizer's parameter groups changed ({'; '.join(groups)}); resume "
                       "with the run's values, or start a new run from these weights with "
                       "--pretrained-checkpoint")
    if refused:
        raise ValueError(f"--load {cfg.load}: the command line differs from the run that saved "
                         f"the checkpoint: {'; '.join(refused)}")
    sched = {k: (saved[k], now[k]) for k in SCHEDULE + GROUPS if k in saved and saved[k] != now[k]}
    if sched:
        notes.append(f"the command line's schedule replaces the checkpoint's (old, new): {sched}")
    return notes
