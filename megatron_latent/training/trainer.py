"""The SFT loop on megatron-core: data order, micro/global batches, schedule, eval, checkpoints.

Short on purpose: building blocks live in build.py (model, DDP, optimizer, scheduler),
step.py (one step through the pipeline schedule) and state.py (exact resume).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core import parallel_state as ps

from megatron_latent import parallel
from megatron_latent.training.run import (LoopConfig, StopSignals, flat_config, resolve_method,
                                          resolve_start, save, setup_training,
                                          start_checkpoint_writer)
from megatron_latent.training.run_logger import RunLogger
from megatron_latent.training.build import unwrap
from megatron_latent.training.step import eval_losses, launch_step


@dataclass
class TrainConfig(LoopConfig):
    valid_data_path: str | None = None
    eval_interval: int = 0
    eval_iters: int = 1
    eval_latent_probes: bool = False  # the cheap latent probes at each evaluation (PP=1)
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    global_batch_size: int = 1
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


def _micro_batches(ds, order: SampleOrder, consumed: int, cfg: TrainConfig,
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
        multiple = m * cfg.seq_length if cfg.pipeline_model_parallel_size > 1 else \
            16 * cfg.tensor_model_parallel_size
        return [_pinned(ds.pack(samples[k * m:(k + 1) * m], pad_to_multiple=multiple))
                for k in range(num_micro)]
    return [_pinned(ds.collate(samples[k * m:(k + 1) * m], pad_to=pad))
            for k in range(num_micro)]


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


def train(cfg: TrainConfig) -> list[dict]:
    from megatron_latent.data.processing import load_hf_processing

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
    method = resolve_method(cfg, resume, tokenizer, mcfg)
    ds_kw = dict(tokenizer=tokenizer, image_processor=image_processor, vocab_size=vocab,
                 seq_length=cfg.seq_length, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                 skip_bad=cfg.skip_bad_samples)
    if cfg.allow_images_outside_folder:  # only record-based datasets take it
        ds_kw["allow_images_outside_folder"] = True
    train_ds = method.sft_dataset(cfg.data_path, **ds_kw)
    valid_ds = method.sft_dataset(cfg.valid_data_path, **ds_kw) if cfg.valid_data_path else None

    model, optimizer, scheduler, iteration, consumed = setup_training(cfg, mcfg, resume, method)

    dp = ps.get_data_parallel_world_size()
    if cfg.global_batch_size % (cfg.micro_batch_size * dp):
        raise ValueError(f"global batch {cfg.global_batch_size} is not a multiple of micro batch "
                         f"{cfg.micro_batch_size} x data parallel {dp}")
    num_micro = cfg.global_batch_size // (cfg.micro_batch_size * dp)
    order = SampleOrder(len(train_ds), cfg.seed)
    log = RunLogger(cfg.train_iters, project=cfg.wandb_project, run_name=cfg.wandb_exp_name,
                    config=flat_config(cfg), wandb_mode=cfg.wandb_mode, log_dir=cfg.log_dir,
                    start_step=iteration)
    if cfg.save:
        start_checkpoint_writer()
    stop, history = StopSignals(), []
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
            mbs = _micro_batches(train_ds, order, consumed, cfg, num_micro, samples)
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
            saving = cfg.save and (stopping or last or
                                   (cfg.save_interval and iteration % cfg.save_interval == 0))
            if evaluate or saving or stopping or last:
                finish()
            if evaluate:
                prefetcher.settle()
                vorder = SampleOrder(len(valid_ds), cfg.seed + 1)
                vm = [mb for k in range(cfg.eval_iters) for mb in
                      _micro_batches(valid_ds, vorder, k * cfg.global_batch_size, cfg, num_micro)]
                ev = eval_losses(model, vm, method)
                if cfg.eval_latent_probes:
                    from megatron_latent.eval.probe_runner import eval_probe_logs

                    ev.update(eval_probe_logs(unwrap(model[0]), method, vm, cfg.seed))
                log.log(iteration, {f"valid {k}": v for k, v in ev.items()})
                history.append({"iteration": iteration, "valid": ev})
            if saving:
                prefetcher.settle()
                save(cfg, mcfg, model, optimizer, scheduler, iteration, consumed, tokenizer, tok_dir,
                     method)
            if stopping:
                break
    finally:
        prefetcher.close()
    log.finish()
    return history


