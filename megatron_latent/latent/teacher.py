"""Teacher visual states (spec 2.4): a stage-1 model's decoder-layer outputs at the pad slots of
the assistant images (`teacher_mask`), {layer: [n_slots, hidden]}, rows in micro-batch order
(row-major: row by row, images in order, slots row-major). Three sources, one shape:

- `capture_states`: a forward-only pass with layer hooks (models/qwen25vl/layer_hooks.py);
- `OnlineTeacher`: a frozen stage-1 model capturing them within the training step;
- `TeacherCache`: the disk cache written by tools/cache_teacher_states.py, read by sample id:
  `teacher/{shard:05d}.safetensors` (tensor "{sample_id}/L{l}" [sum_k H_k*W_k, hidden]) and
  `teacher/index.json` ({sample_id: {shard, grids, layers, model_hash}}).

`alignment_hook` turns target states into a layer hook adding a weighted (1 - cos) loss.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from megatron_latent.data.packing import packed_seq_params
from megatron_latent.latent.base import LatentStep
from megatron_latent.models.qwen25vl.layer_hooks import AuxLoss, select_local, slot_positions

MODEL_INPUTS = ("input_ids", "position_ids", "pixel_values", "image_grid_thw")


def alignment_hook(slots: torch.Tensor, targets: torch.Tensor, weight, seq_len: int,
                   log: list | None = None):
    """A layer hook adding `weight * sum over slots (1 - cos(h[slot], target))`, over the
    slots this rank holds (its SP slice). `slots`: host (row, position) [n, 2] in slot order
    (layer_hooks.slot_positions); `targets` [n, hidden] in the same order; `weight` (float or
    0-d tensor) carries the loss weight and the global normalisation: the gradient is that of
    `weight * sum` as is, so with training/step.py (which divides the head's loss by the global
    CE count) a term lambda * mean over the global batch's (layer, slot) pairs takes
    weight = lambda / n_pairs, not multiplied by the CE count (tests/latent/test_layer_hooks.py).
    `log` gets a detached (sum, count) pair of this rank's slots per call."""
    def hook(h):
        hs, idx = select_local(h, slots, seq_len)
        t = targets.to(h.device, non_blocking=True)[idx]
        per = 1.0 - F.cosine_similarity(hs.float(), t.float(), dim=-1)
        total = per.sum()
        if log is not None:
            log.append(torch.stack([total.detach(), per.new_tensor(float(idx.numel()))]))
        return AuxLoss.apply(h, total * weight)

    return hook


class _Capture(LatentStep):
    """A forward-only step recording the layer outputs at the masked slots (no logits)."""

    def __init__(self, batch: dict, layers, mask_key: str):
        self.slots = slot_positions(batch[mask_key])
        self.seq_len, self.layers, self.states = batch["input_ids"].shape[1], layers, {}

    def layer_hooks(self):
        return {layer: partial(self._grab, layer) for layer in self.layers}

    def _grab(self, layer, h):
        full = h
        if h.shape[0] != self.seq_len:  # the SP slice: gather the sequence over TP
            full = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)
        self.states[layer] = select_local(full, self.slots, self.seq_len)[0].detach().clone()
        return h

    def head(self, model, *, hidden_states, **kwargs):
        return hidden_states.new_zeros(())

    def loss(self, output):
        raise NotImplementedError("a capture step has no loss")


class _CaptureMethod:
    """What `forward_only` (training.step.forward_outputs) needs of a method: `sft_step`."""

    def __init__(self, layers, mask_key):
        self.layers, self.mask_key, self.steps = tuple(layers), mask_key, []

    def sft_step(self, batch):
        self.steps.append(_Capture(batch, self.layers, self.mask_key))
        return self.steps[-1]


def _chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


@torch.no_grad()
def _forward_direct(model, micro_batches, method) -> None:
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("capturing states under pipeline parallelism needs `forward_only` "
                         "(training.step.forward_outputs): the stages run through the schedule")
    device = next(model.parameters()).device
    mode = model.training
    model.eval()
    try:
        for mb in micro_batches:
            b = {k: v.to(device) if torch.is_tensor(v) and k != "image_grid_thw" else v
                 for k, v in mb.items()}
            model(**{k: b.get(k) for k in MODEL_INPUTS}, latent=method.sft_step(b),
                  packed_seq_params=packed_seq_params(b))
    finally:
        model.train(mode)


def capture_many(model, micro_batches: list[dict], layers, *, forward_only=None,
                 mask_key: str = "teacher_mask") -> list[dict[int, torch.Tensor]]:
    """Per micro-batch {layer: [n_slots, hidden]} (model dtype) of the given global 1-based
    layers that this pipeline stage holds, at the `mask_key` slots, complete on every TP rank.
    `model`: a model chunk (or a list of them); `forward_only(chunks, micro_batches, method)`
    runs the pipeline schedule (needed at PP > 1), else the model is called directly."""
    method = _CaptureMethod(layers, mask_key)
    if forward_only is not None:
        forward_only(_chunks(model), micro_batches, method)
    else:
        (chunk,) = _chunks(model)
        _forward_direct(chunk, micro_batches, method)
    return [step.states for step in method.steps]


def capture_states(model, micro_batch: dict, layers, **kwargs) -> dict[int, torch.Tensor]:
    """`capture_many` of one micro-batch."""
    return capture_many(model, [micro_batch], layers, **kwargs)[0]


class OnlineTeacher:
    """A frozen stage-1 model (its own replica, same layout as the student) computing the
    teacher states from stage-1 micro-batches; each stage gets the layers it holds."""

    def __init__(self, model, layers, forward_only=None, mask_key: str = "teacher_mask"):
        self.model, self.layers = model, tuple(layers)
        self.forward_only, self.mask_key = forward_only, mask_key
        for chunk in _chunks(model):
            chunk.requires_grad_(False)

    def states(self, micro_batches: list[dict]) -> list[dict[int, torch.Tensor]]:
        return capture_many(self.model, micro_batches, self.layers,
                            forward_only=self.forward_only, mask_key=self.mask_key)

    def get(self, micro_batch: dict) -> dict[int, torch.Tensor]:
        return self.states([micro_batch])[0]


def cache_dir(root) -> Path:
    """The directory holding index.json: `root/teacher` (the tool's --out) or `root` itself."""
    root = Path(root)
    return root if (root / "index.json").is_file() else root / "teacher"


class TeacherCache:
    """Reads the disk cache. `get(sample_ids, layers)` -> {layer: [sum of n_slots, hidden]},
    the samples' rows concatenated in the given order. `model_hash`: refuse a cache written
    from another model."""

    def __init__(self, root, model_hash: str | None = None, device=None):
        self.dir = cache_dir(root)
        path = self.dir / "index.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no teacher-state index (an unfinished cache? "
                                    "run tools/cache_teacher_states.py to completion)")
        self.index = json.loads(path.read_text())
        if model_hash is not None:
            other = {e["model_hash"] for e in self.index.values()} - {model_hash}
            if other:
                raise ValueError(f"{self.dir}: teacher states of model {sorted(other)}, "
                                 f"expected {model_hash}")
        self.device, self._open = device, {}

    def entry(self, sample_id: str) -> dict:
        try:
            return self.index[sample_id]
        except KeyError:
            raise KeyError(f"sample {sample_id!r} is not in the teacher cache {self.dir}") from None

    def _shard(self, shard: int):
        from safetensors import safe_open

        if shard not in self._open:
            self._open[shard] = safe_open(str(self.dir / f"{shard:05d}.safetensors"), "pt")
        return self._open[shard]

    def get(self, sample_ids, layers) -> dict[int, torch.Tensor]:
        out = {layer: [] for layer in layers}
        for sid in sample_ids:
            e = self.entry(sid)
            n = sum(h * w for h, w in e["grids"])
            for layer in layers:
                if layer not in e["layers"]:
                    raise KeyError(f"sample {sid!r}: layer {layer} not cached ({e['layers']})")
                if not n:  # no assistant images: no tensor
                    continue
                t = self._shard(e["shard"]).get_tensor(f"{sid}/L{layer}")
                if t.shape[0] != n:
                    raise ValueError(f"sample {sid!r} L{layer}: {t.shape[0]} rows, grids "
                                     f"{e['grids']} give {n}")
                out[layer].append(t)
        return {layer: (torch.cat(ts) if ts else self._empty()).to(self.device or "cpu")
                for layer, ts in out.items()}

    def _empty(self) -> torch.Tensor:
        """[0, hidden] in the cache's dtype (from any stored tensor)."""
        for sid, e in self.index.items():
            if any(e["grids"]):
                return self._shard(e["shard"]).get_slice(f"{sid}/L{e['layers'][0]}")[:0]
        raise ValueError(f"{self.dir}: no sample has teacher states")

    def for_micro_batches(self, micro_batches: list[dict], layers) -> list[dict]:
        return [self.get(mb["sample_ids"], layers) for mb in micro_batches]
