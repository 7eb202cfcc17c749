"""The run scaffold every training loop (SFT, RL) shares: its config base, where a run starts
(resume, a pretrained checkpoint, HF weights), the model/optimizer/scheduler set-up, the stop
signals, checkpoint saves with the run's metadata, and the flat config for logging."""

from __future__ import annotations

import json
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_latent import checkpointing, parallel
from megatron_latent.platform import host_copy
from megatron_latent.training import preflight, state
from megatron_latent.training.build import (OptimSettings, build_model, build_optimizer,
                                            build_scheduler, unwrap)


@dataclass
class LoopConfig:
    """What every training loop (SFT, RL) takes: data, weights, checkpoints, layout, schedule,
    logging. The loops' configs extend it."""

    data_path: str
    hf_dir: str | None = None  # initial weights (HF); or a Megatron checkpoint via `load`
    pretrained_checkpoint: str | None = None  # initial weights from a megatron_latent checkpoint
    load: str | None = None
    save: str | None = None
    save_interval: int = 0
    keep_last: int | None = None
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    spec: str = "local"
    bf16: bool = False
    seq_length: int = 4096
    train_iters: int = 100
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"
    optim: OptimSettings = field(default_factory=OptimSettings)
    freeze_vision: bool = True
    freeze_merger: bool = True
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 5120 * 28 * 28
    seed: int = 1234
    wandb_project: str = "megatron_latent"
    wandb_exp_name: str | None = None
    wandb_mode: str | None = None
    log_dir: str | None = None
    model_overrides: dict = field(default_factory=dict)  # Qwen25VLConfig fields (fp8, recompute)
    # the latent method (latent/registry.py) and the hyper-parameters given on the command line;
    # None: the starting checkpoint's method (a run from HF weights then needs one)
    latent_method: str | None = None
    latent_hparams: dict = field(default_factory=dict)
    # resume despite a changed "data_path" / "batch" / "seed" (training/preflight.py)
    resume_overrides: tuple = ()
    allow_images_outside_folder: bool = False  # records may name images outside their folder


class StopSignals:
    """SIGTERM/SIGUSR1 (slurm's pre-timeout signal): checkpoint at the end of a step, exit.

    A signal may reach the ranks a step apart, so they vote: each step queues an all-reduce of
    its flag behind the step's work, and the loop reads the previous step's result (ready by
    then) with `agreed()`, the same answer on every rank without draining the GPU."""

    def __init__(self):
        self.requested = False
        self._votes: list = []
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._set)

    def _set(self, *_):
        self.requested = True

    def vote(self) -> None:
        flag = host_copy.upload(torch.tensor([int(self.requested)], dtype=torch.int32),
                                parallel.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._votes.append(host_copy.Download(flag))

    def agreed(self) -> bool:
        """Whether any rank asked to stop, by the previous step's vote."""
        return len(self._votes) >= 2 and bool(self._votes.pop(0).values().item())

    def agree(self) -> None:
        """Vote and wait for the answer, into `requested` (a loop that waits anyway: RL)."""
        self.vote()
        self.requested = bool(self._votes.pop().values().item())
        self._votes.clear()


def resolve_start(cfg: LoopConfig, overrides: dict):
    """Where a run starts. `--load` holding a checkpoint: resume it (a requeued job finds its
    own saves there). Otherwise a fresh run from `--pretrained-checkpoint` (a megatron_latent
    checkpoint, e.g. the SFT run for RL) or `--hf-dir`. -> (resume, model config, tokenizer dir)."""
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig

    preflight.check_schedule(cfg.train_iters, cfg.lr_warmup_iters)
    # a --load dir with iterations that cannot be resumed raises: never a fresh start over them
    if cfg.load is not None and checkpointing.check_resumable(cfg.load):
        saved = state.saved_train_state(cfg.load)  # None: a converted (weights-only) checkpoint
        notes = [] if saved is None else preflight.check_resume(cfg, saved.get("run_args"),
                                                                 cfg.resume_overrides)
        if notes and dist.get_rank() == 0:
            print(f"resuming {cfg.load}: " + "; ".join(notes), flush=True)
        src, resume = cfg.load, True
    elif cfg.pretrained_checkpoint is not None:
        if not checkpointing.is_checkpoint(cfg.pretrained_checkpoint):
            raise ValueError(f"--pretrained-checkpoint {cfg.pretrained_checkpoint}: not a "
                             "megatron_latent checkpoint (no complete iteration)")
        src, resume = cfg.pretrained_checkpoint, False
    elif cfg.hf_dir is not None:
        return False, Qwen25VLConfig.from_hf(cfg.hf_dir, **overrides), cfg.hf_dir
    else:
        raise ValueError("give --hf-dir or --pretrained-checkpoint (initial weights), or --load "
                         f"with a checkpoint to resume (--load {cfg.load!r} holds none)")
    return resume, checkpointing.config_from_checkpoint(src, **overrides), str(Path(src) / "hf")


def resolve_method(cfg: LoopConfig, resume: bool, tokenizer, mcfg):
    """The run's latent method, its tokens added to `tokenizer`. Resuming: the checkpoint's
    (another --latent-method is an error; hyper-parameters given on the command line win and
    are printed). From a pretrained checkpoint: its method unless --latent-method names one.
    From HF weights: the method their export recorded, else --latent-method."""
    from megatron_latent.latent import registry

    src = cfg.load if resume else (cfg.pretrained_checkpoint or cfg.hf_dir)
    record = registry.record_for(src) if src is not None else None
    trained = resume and state.saved_train_state(cfg.load) is not None  # not a converted one
    if trained and cfg.latent_method not in (None, record["name"]):
        raise ValueError(f"--latent-method {cfg.latent_method}: the checkpoint in --load "
                         f"{cfg.load} was trained with {record['name']!r}; resume it with that "
                         "method, or start a new run (--pretrained-checkpoint) to change it")
    if record is None or cfg.latent_method not in (None, record["name"]):
        if cfg.latent_method is None:
            raise ValueError(f"give --latent-method (one of {', '.join(registry.names())}): "
                             f"the HF weights in {cfg.hf_dir} record no method")
        return registry.build(cfg.latent_method, tokenizer, mcfg, cfg.latent_hparams)
    unknown = set(cfg.latent_hparams) - registry.hparam_names(record["name"])
    if unknown:
        raise ValueError(f"{sorted(unknown)}: not hyper-parameters of the checkpoint's latent "
                         f"method {record['name']!r} (flags of another method?)")
    changed = {k: (record["hparams"].get(k), v) for k, v in cfg.latent_hparams.items()
               if record["hparams"].get(k) != v}
    if changed and dist.get_rank() == 0:
        print(f"latent method {record['name']}: hyper-parameters from the command line replace "
              f"the checkpoint's (old, new): {changed}", flush=True)
    return registry.from_record(record, tokenizer, mcfg, **cfg.latent_hparams)


def setup_training(cfg, mcfg, resume: bool, method=None):
    """Model (DDP), optimizer and scheduler from a loop config (SFT or RL), with the latent
    method's side modules; on resume, the exact train state, or just the weights of a converted
    checkpoint. -> (model chunks, optimizer, scheduler, iteration, consumed samples)."""
    fresh_from_ckpt = not resume and cfg.pretrained_checkpoint is not None
    model = build_model(mcfg, None if resume or fresh_from_ckpt else cfg.hf_dir,
                        use_distributed_optimizer=cfg.optim.use_distributed_optimizer,
                        freeze_vision=cfg.freeze_vision, freeze_merger=cfg.freeze_merger,
                        latent_method=method)
    if fresh_from_ckpt:
        _load_weights(cfg.pretrained_checkpoint, unwrap(model[0]), method)
    optimizer = build_optimizer(model, cfg.optim,
                                method.optimizer_overrides() if method is not None else None)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train_iters, cfg.lr_warmup_iters,
                                cfg.lr_decay_style)
    iteration, consumed = 0, 0
    if resume:
        if state.saved_train_state(cfg.load) is not None:
            ts = state.load(cfg.load, model, optimizer, scheduler)
            iteration, consumed = ts["iteration"], ts["consumed_samples"]
        else:  # a converted (model-only) checkpoint: start training from its weights
            _load_weights(cfg.load, unwrap(model[0]), method)
    return model, optimizer, scheduler, iteration, consumed


def _load_weights(ckpt, model, method) -> None:
    """A checkpoint's weights as a run's start. Saved by another method (a plain converted
    Qwen2.5-VL, or LVR's SFT for a new method) or by an earlier stage of this one without side
    modules (DeepLatent's stage 1), it holds none of them: they keep their fresh values."""
    from megatron_latent.latent import registry

    recorded = registry.checkpoint_record(checkpointing.read_metadata(ckpt))["name"]
    modules = model.latent_modules
    if method is not None and (recorded != method.name or not any(
            k.startswith("latent_modules.") for k in checkpointing.tensor_keys(ckpt))):
        model.latent_modules = None
    try:
        checkpointing.load_model(ckpt, model)
    finally:
        model.latent_modules = modules


def start_checkpoint_writer() -> None:
    """Start megatron-core's checkpoint-writer manager process (spawned once, reused by every
    save) with SIGTERM/SIGUSR1 ignored: slurm signals every process of the job step, and the
    manager dying of them would make the save on that signal fail. It dies with this process,
    even on SIGKILL (training/checkpoint_writer.py)."""
    from megatron_latent.training import checkpoint_writer

    checkpoint_writer.start()


def save(cfg, mcfg, model, optimizer, scheduler, iteration, consumed, tokenizer, tok_dir,
         method=None, run_args: dict | None = None):
    """`run_args`: what the checkpoint records of the run, checked on resume (default:
    preflight.run_args(cfg): data, batch size, seed, schedule)."""
    # metadata first: a published iteration must always be loadable
    if dist.get_rank() == 0 and not (Path(cfg.save) / checkpointing.META).is_file():
        from megatron_latent.latent import registry

        hf_config = json.loads((Path(tok_dir) / "config.json").read_text())
        checkpointing.write_metadata(
            cfg.save, hf_config, mcfg.spec, mcfg.params_dtype, tok_dir,
            vision_ffn_divisible_by=mcfg.vision_ffn_divisible_by,
            latent_method=registry.describe(method) if method is not None else None)
        tokenizer.save_pretrained(Path(cfg.save) / "hf")  # with the added latent tokens
    dist.barrier()
    state.save(cfg.save, iteration, model, optimizer, scheduler,
               {"iteration": iteration, "consumed_samples": consumed,
                "run_args": run_args if run_args is not None else preflight.run_args(cfg)},
               keep_last=cfg.keep_last)


def flat_config(cfg: LoopConfig) -> dict:
    d = asdict(cfg)
    d.update({f"optim.{k}": v for k, v in d.pop("optim").items()})
    return d
