"""LVR stage-1 dataset: one record -> one prepared, unpadded sample (batches: collate.py).

Layout (Qwen2.5 chat format, tokenised piece by piece so every id's role is known):

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n ...text... <|vision_start|><|image_pad|>*n_k<|vision_end|> ...<|im_end|>\\n
    <|im_start|>assistant\\n ...text... <|lvr_start|><|lvr|>*N_i<|lvr_end|> ...<|im_end|>\\n

The system and user turns and the assistant header are data/chat.py's layout, which also builds
the prompts of generation, evaluation and RL (a newline next to `<image>` is dropped, as in the
seed's data and as the chat template renders [image, text]).

CE-supervised targets: every assistant-turn content token and its `<|im_end|>`, except targets
equal to `<|lvr|>` (those are regressed). Not supervised: the "assistant\\n" header (the prompt at
inference ends with it), the "\\n" after `<|im_end|>` (generation stops at `<|im_end|>`; the seed
does supervise it), system and user turns. The header "assistant\\n" is tokenised on its own, as
it is at inference, so the first answer token starts a new BPE token as when it is generated.
"""

from __future__ import annotations

import itertools
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from megatron_latent.data import chat
from megatron_latent.data.chat import DEFAULT_SYSTEM
from megatron_latent.data.errors import tally_skips
from megatron_latent.data.llava_records import (LVR_PLACEHOLDER, LvrDataError, Record,
                                              bbox_token_indices, load_records)
from megatron_latent.data.images import ImageError, open_image
from megatron_latent.data.lvr_tokens import TokenIds, load_hf_processing

logger = logging.getLogger(__name__)

STAGE1_MIN_PIXELS, STAGE1_MAX_PIXELS = 128 * 28 * 28, 5120 * 28 * 28


class LvrSftDataset(Dataset):
    """Samples: input_ids/labels [L] long, loss_mask [L] float, pixel_values [n_patches, 1176],
    image_grid_thw [n_img, 3], latent_index [n_lat] (per <|lvr|>, index into this sample's
    concatenated merged image features), source (file, record index).

    Record structure is checked at construction (JSON errors always raise there). Images and
    sequence length are checked lazily in __getitem__, or up front when `scan` (default: when
    `skip_bad`; image headers only, read by `scan_workers` threads). `skip_bad` leaves bad records
    out and counts them by reason in `self.skipped` (logged once); a record that fails only when
    its image is decoded (truncated data) is skipped and counted when it is loaded.
    Images are opened by data/images.py: inside their folder (unless
    `allow_images_outside_folder`), regular files only, any pixel mode made RGB or refused."""

    def __init__(self, data_path, *, tokenizer, image_processor, vocab_size: int,
                 seq_length: int | None, image_folder=None, min_pixels: int = STAGE1_MIN_PIXELS,
                 max_pixels: int = STAGE1_MAX_PIXELS, skip_bad: bool = False, scan: bool | None = None,
                 scan_workers: int = 16, system_prompt: str = DEFAULT_SYSTEM,
                 latent_tokens: bool = True, allow_images_outside_folder: bool = False):
        from qwen_vl_utils.vision_process import SPATIAL_MERGE_SIZE

        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.ids = TokenIds.from_tokenizer(tokenizer, vocab_size, latent=latent_tokens)
        self.patch, self.merge = image_processor.patch_size, image_processor.merge_size
        self.temporal = image_processor.temporal_patch_size
        if self.merge != SPATIAL_MERGE_SIZE:
            raise ValueError(f"merge_size {self.merge} != qwen_vl_utils' {SPATIAL_MERGE_SIZE}")
        self.seq_length, self.min_pixels, self.max_pixels = seq_length, min_pixels, max_pixels
        self.data_path = str(data_path)
        self._system = system_prompt
        self.skipped: dict[str, int] = {}
        self.skip_examples: dict[str, str] = {}
        errors = []
        self.records = load_records(data_path, image_folder, errors.append if skip_bad else None,
                                    allow_outside_folder=allow_images_outside_folder)
        self.skip_bad, self._failed = skip_bad, set()
        keep = np.arange(len(self.records), dtype=np.int64)
        if skip_bad if scan is None else scan:
            keep = self._scan(errors, scan_workers, raise_first=not skip_bad)
        self._keep = keep
        tally_skips(errors, len(keep), data_path, "records", self.skipped, self.skip_examples,
                    logger)

    @classmethod
    def from_hf_dir(cls, data_path, hf_dir, **kwargs) -> "LvrSftDataset":
        """Tokenizer, image processor and vocab_size from a Hugging Face checkpoint dir."""
        tokenizer, image_processor, vocab_size = load_hf_processing(hf_dir)
        return cls(data_path, tokenizer=tokenizer, image_processor=image_processor,
                   vocab_size=vocab_size, **kwargs)

    # ---- access -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._keep)

    def record(self, i: int) -> Record:
        return self.records[int(self._keep[i])]

    @property
    def collate_kwargs(self) -> dict:
        return dict(pad_id=self.ids.pad, image_token_id=self.ids.image_pad,
                    lvr_token_id=self.ids.lvr, spatial_merge_size=self.merge)

    def collate(self, samples: list[dict], pad_to: int | None = None) -> dict:
        from megatron_latent.data.collate import collate

        return collate(samples, pad_to=pad_to, **self.collate_kwargs)

    def pack(self, samples: list[dict], pad_to_multiple: int) -> dict:
        from megatron_latent.data.packing import pack

        return pack(samples, pad_to_multiple=pad_to_multiple, **self.collate_kwargs)

    def __getitem__(self, i: int) -> dict:
        """Sample i; with `skip_bad`, a sample that fails to load is counted and replaced by the
        next one that loads (a step keeps its size; a resume sees the same replacements)."""
        if not self.skip_bad:
            return self._sample(i)
        for j in range(len(self)):
            k = (i + j) % len(self)
            if k in self._failed:
                continue
            try:
                return self._sample(k)
            except LvrDataError as e:
                self._failed.add(k)
                self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
                self.skip_examples.setdefault(e.reason, str(e))
                logger.warning("skipped at load time (%s so far): %s", self.skipped, e)
        raise ValueError(f"{self.data_path}: no record loads; skipped {self.skipped}: "
                         f"{list(self.skip_examples.values())}")

    def _sample(self, i: int) -> dict:
        rec = self.record(i)
        images = [self._load(rec, k) for k in range(len(rec.images))]
        grids = [self._grid(rec, k, im.size) for k, im in enumerate(images)]
        ids, sup, latent = self._encode(rec, grids)
        self._check_length(rec, ids, grids)
        if images:
            pixels, thw = self._pixels(rec, images, grids)
        else:
            pixels = torch.zeros(0, 3 * self.temporal * self.patch ** 2)
            thw = torch.zeros(0, 3, dtype=torch.long)
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.cat([input_ids[1:], input_ids.new_full((1,), self.ids.pad)])
        target_sup = torch.tensor(sup[1:] + [False]) & (labels != self.ids.lvr)
        return {"input_ids": input_ids, "labels": labels, "loss_mask": target_sup.float(),
                "pixel_values": pixels, "image_grid_thw": thw,
                "latent_index": torch.tensor(latent, dtype=torch.long),
                "source": (rec.file, rec.index)}

    # ---- images -----------------------------------------------------------------------------
    def _load(self, rec: Record, k: int) -> Image.Image:
        try:  # missing, not a regular file, truncated, unsupported mode, decompression bomb, ...
            return open_image(rec.images[k])
        except ImageError as e:
            raise LvrDataError(rec.file, rec.index, f"image[{k}]", str(e), "image") from None

    def _grid(self, rec: Record, k: int, size) -> tuple[int, int, int]:
        from qwen_vl_utils import smart_resize

        w, h = size
        try:
            rh, rw = smart_resize(h, w, factor=self.patch * self.merge,
                                  min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        except ValueError as e:  # aspect ratio over 200
            raise LvrDataError(rec.file, rec.index, f"image[{k}]", f"{rec.images[k]}: {e}",
                               "image") from e
        return 1, rh // self.patch, rw // self.patch

    def _pixels(self, rec: Record, images, grids):
        from qwen_vl_utils import fetch_image

        resized = []
        for k, im in enumerate(images):
            try:
                resized.append(fetch_image({"image": im, "min_pixels": self.min_pixels,
                                            "max_pixels": self.max_pixels}, image_patch_size=self.patch))
            except Exception as e:
                raise LvrDataError(rec.file, rec.index, f"image[{k}]",
                                   f"cannot convert {rec.images[k]}: {e}", "image") from e
        out = self.image_processor(images=resized, do_resize=False, return_tensors="pt")
        if out["image_grid_thw"].tolist() != [list(g) for g in grids]:
            raise RuntimeError(f"{rec.file}: record {rec.index}: image processor grids "
                               f"{out['image_grid_thw'].tolist()} != planned {grids}")
        return out["pixel_values"], out["image_grid_thw"].long()

    # ---- tokens -----------------------------------------------------------------------------
    def _encode(self, rec: Record, grids) -> tuple[list[int], list[bool], list[int]]:
        """Token ids, per-token "assistant-turn token" flags, latent feature indices."""
        t = self.ids
        latent = []
        merged = [gt * gh * gw // self.merge ** 2 for gt, gh, gw in grids]
        offsets = [0, *itertools.accumulate(merged)]
        turns = list(rec.turns)
        system = turns.pop(0)[1] if turns[0][0] == "system" else self._system
        # (text or ids, supervised); system/user turns and the header: data/chat.py's layout, the
        # one inference prompts are built with
        pieces = chat.system_turn(t, system)
        images, boxes = iter(merged), iter(rec.boxes)
        for role, value in turns:
            if role == "user":
                pieces += chat.user_turn(t, chat.split_at_images(value), images)
                continue
            pieces += chat.assistant_header(t)
            for j, part in enumerate(value.split(LVR_PLACEHOLDER)):
                if j:
                    k, xyxy = next(boxes)
                    idx = bbox_token_indices(xyxy, grids[k][1:], self.merge)
                    latent.extend(offsets[k] + i for i in idx)
                    pieces.append(([t.lvr_start] + [t.lvr] * len(idx) + [t.lvr_end], True))
                pieces.append((part, True))
            pieces += [([t.im_end], True), ("\n", False)]
        ids, sup = chat.tokenize(self.tokenizer, pieces)
        return ids, sup, latent

    def _check_length(self, rec: Record, ids, grids) -> None:
        if self.seq_length is not None and len(ids) > self.seq_length:
            n_img = sum(gt * gh * gw for gt, gh, gw in grids) // self.merge ** 2
            raise LvrDataError(rec.file, rec.index, "conversations",
                               f"sample has {len(ids)} tokens > seq_length {self.seq_length} "
                               f"({n_img} image tokens, {ids.count(self.ids.lvr)} latent tokens)",
                               "too_long")

    # ---- up-front scan ----------------------------------------------------------------------
    def _scan(self, errors: list, workers: int, raise_first: bool) -> np.ndarray:
        """Check images (headers only, in threads) and lengths of every record; tokenising stays
        on this thread (HF tokenizers are not safe to share between threads)."""
        def sizes(i):
            rec = self.records[i]
            out = []
            for k, p in enumerate(rec.images):
                try:
                    out.append(open_image(p, decode=False).size)
                except ImageError as e:
                    return rec, LvrDataError(rec.file, rec.index, f"image[{k}]", str(e), "image")
            return rec, out

        keep, n, chunk = [], len(self.records), 4096  # chunks bound the results held at once
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                for i, (rec, got) in zip(range(lo, hi), pool.map(sizes, range(lo, hi))):
                    try:
                        if isinstance(got, LvrDataError):
                            raise got
                        grids = [self._grid(rec, k, s) for k, s in enumerate(got)]
                        self._check_length(rec, self._encode(rec, grids)[0], grids)
                        keep.append(i)
                    except LvrDataError as e:
                        if raise_first:
                            raise
                        errors.append(e)
        return np.asarray(keep, dtype=np.int64)
