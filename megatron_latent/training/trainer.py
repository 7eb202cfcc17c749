"""The SFT loop on megatron-core: data order, micro/global batches, schedule, eval, checkpoints.

Short on purpose: building blocks live in build.py (model, DDP, optimizer, scheduler),
step.py (one step through the pipeline schedule) and state.py (exact resume).
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_latent import checkpointing, parallel
from megatron_latent.platform import host_copy
from megatron_latent.training import state
from megatron_latent.training.build import (OptimSettings, build_model, build_optimizer,
                                            build_scheduler, unwrap)
from megatron_latent.training.run_logger import RunLogger
from megatron_latent.training.step import eval_losses, launch_step


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


@dataclass
class TrainConfig(LoopConfig):
    valid_data_path: str | None = None
    eval_interval: int = 0
    eval_iters: int = 1
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    global_batch_size: int = 1
    lvr_lambda: float = 0.1
    skip_bad_samples: bool = False
    pack_sequences: bool = False  # THD: a micro-batch's samples in one row (TE spec)


class SampleOrder:
    """Deterministic global order (a fresh permutation per epoch); resumable from a count."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perm = n, seed, {}

    def _epoch(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng(self.seed + epoch).permutation(self.n)}
        return self._perm[epoch]

    def take(self, start: int, count: int) -> list[int]:
        return [int(self._epoch(k // self.n)[k % self.n]) for k in range(start, start + count)]


def _my_indices(order: SampleOrder, consumed: int, cfg: TrainConfig, num_micro: int) -> list[int]:
    """This data-parallel rank's sample indices of the global batch starting at `consumed`."""
    r, n = ps.get_data_parallel_rank(), num_micro * cfg.micro_batch_size
    return order.take(consumed, cfg.global_batch_size)[r * n:(r + 1) * n]


def _micro_batches(ds, collate, order: SampleOrder, consumed: int, cfg: TrainConfig,
                   num_micro: int, samples: list | None = None) -> list[dict]:
    """This data-parallel rank's micro-batches for one global batch, all padded to one length
    (`samples`: this rank's samples when already loaded, e.g. by a `SamplePrefetcher`)."""
    if samples is None:
        samples = [ds[i] for i in _my_indices(order, consumed, cfg, num_micro)]
    if cfg.pipeline_model_parallel_size > 1:
        pad = cfg.seq_length  # the pipeline sends fixed-shape activations
    else:
        longest = parallel.model_parallel_max(max(len(x["input_ids"]) for x in samples))
        pad = pad_length(longest, cfg.tensor_model_parallel_size)
    m = cfg.micro_batch_size
    if cfg.pack_sequences:  # one row per micro-batch; PP needs one fixed length for all
        from megatron_latent.data.packing import pack

        multiple = m * cfg.seq_length if cfg.pipeline_model_parallel_size > 1 else \
            16 * cfg.tensor_model_parallel_size
        return [_pinned(pack(samples[k * m:(k + 1) * m], pad_to_multiple=multiple,
                             **ds.collate_kwargs)) for k in range(num_micro)]
    return [_pinned(collate(samples[k * m:(k + 1) * m], pad_to=pad)) for k in range(num_micro)]


def _pinned(batch: dict) -> dict:
    """Page-locked host tensors: the step's copies to the GPU are then asynchronous (from
    pageable memory each copy would hold the host until it is done)."""
    if not torch.cuda.is_available():
        return batch
    return {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}


class SamplePrefetcher:
    """Loads the next step's samples (image decoding, resizing, tokenizing) on a background
    thread while the current step runs on the GPU. One thread: the dataset is not used
    concurrently (HF fast tokenizers are not safe for that). The padding agreement over ranks
    and the collate stay on the main thread, in step order, like every other collective.
    A sample that fails to load raises its own error when its step asks for it."""

    def __init__(self, ds, order: SampleOrder, cfg: TrainConfig, num_micro: int):
        from concurrent.futures import ThreadPoolExecutor

        self.ds, self.order, self.cfg, self.num_micro = ds, order, cfg, num_micro
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="samples")
        self.pending: dict[int, object] = {}

    def _load(self, consumed: int) -> list:
        return [self.ds[i] for i in _my_indices(self.order, consumed, self.cfg, self.num_micro)]

    def prefetch(self, consumed: int) -> None:
        if consumed not in self.pending:
            self.pending[consumed] = self.pool.submit(self._load, consumed)

    def get(self, consumed: int) -> list:
        self.prefetch(consumed)
        return self.pending.pop(consumed).result()

    def settle(self) -> None:
        """Wait until the background load is done (before the main thread uses the shared
        tokenizer/processor itself: evaluation, checkpoint saving)."""
        for f in self.pending.values():
            f.exception()  # waits; an error is raised later by get()

    def close(self) -> None:
        for f in self.pending.values():
            f.cancel()
        self.pool.shutdown(wait=True)


def pad_length(longest: int, tp: int) -> int:
    """Padded sequence length of a step: a multiple of 16 * TP (FP8 GEMMs want multiples of
    16; sequence parallelism splits the sequence over TP ranks)."""
    multiple = 16 * tp
    return -(-longest // multiple) * multiple


class _Stop:
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


def train(cfg: TrainConfig) -> list[dict]:
    from megatron_latent.data.collate import collate
    from megatron_latent.data.lvr_dataset import LvrSftDataset
    from megatron_latent.data.lvr_tokens import load_hf_processing
    from megatron_latent.latent.lvr import LVR

    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    if cfg.pack_sequences and cfg.spec != "te":
        raise ValueError("--pack-sequences needs the TE spec (THD attention): "
                         "--transformer-impl transformer_engine")
    parallel.initialize(parallel.ParallelConfig(tp, pp, sequence_parallel=cfg.sequence_parallel),
                        seed=cfg.seed)
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    overrides = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                     sequence_parallel=cfg.sequence_parallel, spec=cfg.spec, params_dtype=dtype,
                     **cfg.model_overrides)
    resume, mcfg, tok_dir = resolve_start(cfg, overrides)
    tokenizer, image_processor, vocab = load_hf_processing(tok_dir)
    ds_kw = dict(tokenizer=tokenizer, image_processor=image_processor, vocab_size=vocab,
                 seq_length=cfg.seq_length, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                 skip_bad=cfg.skip_bad_samples)
    train_ds = LvrSftDataset(cfg.data_path, **ds_kw)
    valid_ds = LvrSftDataset(cfg.valid_data_path, **ds_kw) if cfg.valid_data_path else None
    ids = train_ds.ids
    method = LVR(lvr_id=ids.lvr, start_id=ids.lvr_start, end_id=ids.lvr_end,
                 hidden_size=mcfg.hidden_size, loss_lambda=cfg.lvr_lambda)

    model, optimizer, scheduler, iteration, consumed = setup_training(cfg, mcfg, resume)

    dp = ps.get_data_parallel_world_size()
    if cfg.global_batch_size % (cfg.micro_batch_size * dp):
        raise ValueError(f"global batch {cfg.global_batch_size} is not a multiple of micro batch "
                         f"{cfg.micro_batch_size} x data parallel {dp}")
    num_micro = cfg.global_batch_size // (cfg.micro_batch_size * dp)
    coll = lambda samples, pad_to: collate(samples, pad_to=pad_to, **train_ds.collate_kwargs)  # noqa: E731
    order = SampleOrder(len(train_ds), cfg.seed)
    log = RunLogger(cfg.train_iters, project=cfg.wandb_project, run_name=cfg.wandb_exp_name,
                    config=_flat(cfg), wandb_mode=cfg.wandb_mode, log_dir=cfg.log_dir,
                    start_step=iteration)
    if cfg.save:
        _start_checkpoint_writer()
    stop, history = _Stop(), []
    prefetcher = SamplePrefetcher(train_ds, order, cfg, num_micro)
    # Step n+1 is launched before step n's logs are read, so the GPU never waits for the host
    # at a step boundary; a step is finished (its logs read, its gradients checked) before
    # anything that needs it: evaluation, a checkpoint, the end.
    in_flight = None

    def finish(end: float | None = None):
        """Read the step in flight; its time runs from its loop pass's start to `end` (the next
        step's start, or now), so saves and evaluations are not counted in it."""
        nonlocal in_flight
        it, pending, extras, start = in_flight
        in_flight = None
        try:
            out = pending.result()
        except FloatingPointError as e:
            raise FloatingPointError(f"iteration {it}: {e}") from None
        out.update(extras, step_s=(end or time.perf_counter()) - start)
        history.append({"iteration": it, **out})
        log.log(it, {k: v for k, v in out.items() if k != "update_ok"})

    try:
        while iteration < cfg.train_iters:
            start = time.perf_counter()
            samples = prefetcher.get(consumed)
            if iteration + 1 < cfg.train_iters:  # the next step's samples load during this one
                prefetcher.prefetch(consumed + cfg.global_batch_size)
            mbs = _micro_batches(train_ds, coll, order, consumed, cfg, num_micro, samples)
            launched = launch_step(model, optimizer, mbs, method)
            stop.vote()
            scheduler.step(increment=1)
            iteration += 1
            consumed += cfg.global_batch_size
            extras = {"tokens": sum(int(mb["input_ids"].numel()) for mb in mbs),
                      "lr": scheduler.get_lr(optimizer.param_groups[0])}
            if in_flight is not None:
                finish(start)
            in_flight = (iteration, launched, extras, start)
            last = iteration == cfg.train_iters
            stopping = stop.agreed()
            evaluate = (valid_ds is not None and cfg.eval_interval
                        and iteration % cfg.eval_interval == 0)
            save = cfg.save and (stopping or last or
                                 (cfg.save_interval and iteration % cfg.save_interval == 0))
            if evaluate or save or stopping or last:
                finish()
            if evaluate:
                prefetcher.settle()
                vorder = SampleOrder(len(valid_ds), cfg.seed + 1)
                vcoll = lambda s, pad_to: collate(s, pad_to=pad_to, **valid_ds.collate_kwargs)  # noqa: E731
                vm = [mb for k in range(cfg.eval_iters) for mb in
                      _micro_batches(valid_ds, vcoll, vorder, k * cfg.global_batch_size, cfg, num_micro)]
                ev = eval_losses(model, vm, method)
                log.log(iteration, {f"valid {k}": v for k, v in ev.items()})
            if save:
                prefetcher.settle()
                _save(cfg, mcfg, model, optimizer, scheduler, iteration, consumed, tokenizer, tok_dir)
            if stopping:
                break
    finally:
        prefetcher.close()
    log.finish()
    return history


def resolve_start(cfg: LoopConfig, overrides: dict):
    """Where a run starts. `--load` holding a checkpoint: resume it (a requeued job finds its
    own saves there). Otherwise a fresh run from `--pretrained-checkpoint` (a megatron_latent
    checkpoint, e.g. the SFT run for RL) or `--hf-dir`. -> (resume, model config, tokenizer dir)."""
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig

    if cfg.load is not None and checkpointing.is_checkpoint(cfg.load):
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


def setup_training(cfg, mcfg, resume: bool):
    """Model (DDP), optimizer and scheduler from a loop config (SFT or RL); on resume, the exact
    train state, or just the weights of a converted checkpoint.
    -> (model chunks, optimizer, scheduler, iteration, consumed samples)."""
    fresh_from_ckpt = not resume and cfg.pretrained_checkpoint is not None
    model = build_model(mcfg, None if resume or fresh_from_ckpt else cfg.hf_dir,
                        use_distributed_optimizer=cfg.optim.use_distributed_optimizer,
                        freeze_vision=cfg.freeze_vision, freeze_merger=cfg.freeze_merger)
    if fresh_from_ckpt:
        checkpointing.load_model(cfg.pretrained_checkpoint, unwrap(model[0]))
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train_iters, cfg.lr_warmup_iters,
                                cfg.lr_decay_style)
    iteration, consumed = 0, 0
    if resume:
        if state.saved_train_state(cfg.load) is not None:
            ts = state.load(cfg.load, model, optimizer, scheduler)
            iteration, consumed = ts["iteration"], ts["consumed_samples"]
        else:  # a converted (model-only) checkpoint: start training from its weights
            checkpointing.load_model(cfg.load, unwrap(model[0]))
    return model, optimizer, scheduler, iteration, consumed


def _start_checkpoint_writer() -> None:
    """Start megatron-core's checkpoint-writer manager process (spawned once, reused by every
    save) with SIGTERM/SIGUSR1 ignored (SIG_IGN survives exec): slurm signals every process of
    the job step, and the manager dying of them would make the save on that signal fail."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        filesystem_async.get_write_results_queue()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _save(cfg, mcfg, model, optimizer, scheduler, iteration, consumed, tokenizer, tok_dir):
    # metadata first: a published iteration must always be loadable
    if dist.get_rank() == 0 and not (Path(cfg.save) / checkpointing.META).is_file():
        hf_config = json.loads((Path(tok_dir) / "config.json").read_text())
        checkpointing.write_metadata(cfg.save, hf_config, mcfg.spec, mcfg.params_dtype, tok_dir,
                                     vision_ffn_divisible_by=mcfg.vision_ffn_divisible_by)
        tokenizer.save_pretrained(Path(cfg.save) / "hf")  # with the added latent tokens
    dist.barrier()
    state.save(cfg.save, iteration, model, optimizer, scheduler,
               {"iteration": iteration, "consumed_samples": consumed}, keep_last=cfg.keep_last)


def _flat(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d.update({f"optim.{k}": v for k, v in d.pop("optim").items()})
    return d
