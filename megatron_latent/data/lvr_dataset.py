"""LVR stage-1 dataset: one record -> one prepared, unpadded sample (batches: collate.py).

Layout (Qwen2.5 chat format, tokenised piece by piece so every id's role is known):

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n ...text... <|vision_start|><|image_pad|>*n_k<|vision_end|> ...<|im_end|>\\n
    <|im_start|>assistant\\n ...text... <|lvr_start|><|lvr|>*N_i<|lvr_end|> ...<|im_end|>\\n

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

from megatron_latent.data.llava_records import (IMAGE_PLACEHOLDER, LVR_PLACEHOLDER, LvrDataError,
                                              Record, bbox_token_indices, load_records)
from megatron_latent.data.lvr_tokens import TokenIds, load_hf_processing

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM = "You are a helpful assistant."
STAGE1_MIN_PIXELS, STAGE1_MAX_PIXELS = 128 * 28 * 28, 5120 * 28 * 28


class LvrSftDataset(Dataset):
    """Samples: input_ids/labels [L] long, loss_mask [L] float, pixel_values [n_patches, 1176],
    image_grid_thw [n_img, 3], latent_index [n_lat] (per <|lvr|>, index into this sample's
    concatenated merged image features), source (file, record index).

    Record structure is checked at construction (JSON errors always raise there). Images and
    sequence length are checked lazily in __getitem__, or up front when `scan` (default: when
    `skip_bad`; image headers only, read by `scan_workers` threads). `skip_bad` leaves bad records
    out and counts them by reason in `self.skipped` (logged once)."""

    def __init__(self, data_path, *, tokenizer, image_processor, vocab_size: int,
                 seq_length: int | None, image_folder=None, min_pixels: int = STAGE1_MIN_PIXELS,
                 max_pixels: int = STAGE1_MAX_PIXELS, skip_bad: bool = False, scan: bool | None = None,
                 scan_workers: int = 16, system_prompt: str = DEFAULT_SYSTEM):
        from qwen_vl_utils.vision_process import SPATIAL_MERGE_SIZE

        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.ids = TokenIds.from_tokenizer(tokenizer, vocab_size)
        self.patch, self.merge = image_processor.patch_size, image_processor.merge_size
        self.temporal = image_processor.temporal_patch_size
        if self.merge != SPATIAL_MERGE_SIZE:
            raise ValueError(f"merge_size {self.merge} != qwen_vl_utils' {SPATIAL_MERGE_SIZE}")
        self.seq_length, self.min_pixels, self.max_pixels = seq_length, min_pixels, max_pixels
        self.data_path = str(data_path)
        self._header = {r: tokenizer.encode(t, add_special_tokens=False)
                        for r, t in (("user", "user\n"), ("assistant", "assistant\n"), ("nl", "\n"))}
        self._system = system_prompt
        self.skipped: dict[str, int] = {}
        self.skip_examples: dict[str, str] = {}
        errors = []
        self.records = load_records(data_path, image_folder, errors.append if skip_bad else None)
        keep = np.arange(len(self.records), dtype=np.int64)
        if skip_bad if scan is None else scan:
            keep = self._scan(errors, scan_workers, raise_first=not skip_bad)
        self._keep = keep
        for e in errors:
            self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
            self.skip_examples.setdefault(e.reason, str(e))
        if errors and not len(keep):
            raise ValueError(f"{data_path}: all {len(errors)} records are bad: {self.skipped}; "
                             f"first of each: {list(self.skip_examples.values())}")
        if errors:
            logger.warning("%s: skipped %d of %d records by reason %s; first of each: %s",
                           data_path, len(errors), len(errors) + len(keep), self.skipped,
                           list(self.skip_examples.values()))

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

    def __getitem__(self, i: int) -> dict:
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
        try:
            with Image.open(rec.images[k]) as im:
                im.load()
                return im
        except Exception as e:  # missing, unreadable, truncated, decompression bomb, ...
            raise LvrDataError(rec.file, rec.index, f"image[{k}]",
                               f"cannot read {rec.images[k]}: {type(e).__name__}: {e}", "image") from e

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
        pieces, latent = [], []  # (text or ids, supervised); texts are tokenised in one batch
        merged = [gt * gh * gw // self.merge ** 2 for gt, gh, gw in grids]
        offsets = [0, *itertools.accumulate(merged)]
        turns = list(rec.turns)
        system = turns.pop(0)[1] if turns[0][0] == "system" else self._system
        pieces += [([t.im_start], False), ("system\n" + system, False), ([t.im_end], False),
                   (self._header["nl"], False)]
        images, boxes = iter(range(len(grids))), iter(rec.boxes)
        for role, value in turns:
            pieces.append(([t.im_start], False))
            if role == "user":
                for j, part in enumerate(value.split(IMAGE_PLACEHOLDER)):
                    if j:
                        n = merged[next(images)]
                        pieces.append(([t.vision_start] + [t.image_pad] * n + [t.vision_end], False))
                    pieces.append(("user\n" + part if j == 0 else part, False))
            else:
                pieces.append((self._header["assistant"], False))
                for j, part in enumerate(value.split(LVR_PLACEHOLDER)):
                    if j:
                        k, xyxy = next(boxes)
                        idx = bbox_token_indices(xyxy, grids[k][1:], self.merge)
                        latent.extend(offsets[k] + i for i in idx)
                        pieces.append(([t.lvr_start] + [t.lvr] * len(idx) + [t.lvr_end], True))
                    pieces.append((part, True))
            pieces += [([t.im_end], role == "assistant"), (self._header["nl"], False)]
        texts = [p for p, _ in pieces if isinstance(p, str) and p]
        encoded = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        ids, sup = [], []
        for p, s in pieces:
            if isinstance(p, str):
                if not p:
                    continue
                p = next(encoded)
            ids.extend(p)
            sup.extend([s] * len(p))
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
                    with Image.open(p) as im:
                        out.append(im.size)
                except Exception as e:
                    return rec, LvrDataError(rec.file, rec.index, f"image[{k}]",
                                             f"cannot read {p}: {type(e).__name__}: {e}", "image")
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
