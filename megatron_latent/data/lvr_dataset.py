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

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from megatron_latent.data.lvr_records import (IMAGE_PLACEHOLDER, LVR_PLACEHOLDER, LvrDataError,
                                              Record, bbox_token_indices, load_records)

logger = logging.getLogger(__name__)

LVR_TOKENS = ("<|lvr_start|>", "<|lvr|>", "<|lvr_end|>")
DEFAULT_SYSTEM = "You are a helpful assistant."
STAGE1_MIN_PIXELS, STAGE1_MAX_PIXELS = 128 * 28 * 28, 5120 * 28 * 28


def _single_id(tokenizer, token: str) -> int:
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or tokenizer.encode(token, add_special_tokens=False) != [i]:
        raise ValueError(f"{token} does not tokenize to one id with this tokenizer "
                         f"(got {tokenizer.encode(token, add_special_tokens=False)})")
    return i


def add_lvr_tokens(tokenizer, vocab_size: int) -> dict[str, int]:
    """Add <|lvr_start|>, <|lvr|>, <|lvr_end|> (in that order, special) at the first free ids;
    idempotent. `vocab_size` = the config's embedding rows: we never resize embeddings."""
    missing = [t for t in LVR_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        first = len(tokenizer)
        if first + len(missing) > vocab_size:
            raise ValueError(f"cannot add {missing}: they would take ids {first}.."
                             f"{first + len(missing) - 1}, but the model has only {vocab_size} "
                             "embedding rows (config vocab_size); embeddings are never resized")
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = {t: _single_id(tokenizer, t) for t in LVR_TOKENS}
    if too_big := {t: i for t, i in ids.items() if i >= vocab_size}:
        raise ValueError(f"LVR token ids {too_big} are >= vocab_size {vocab_size}")
    return ids


@dataclass(frozen=True)
class TokenIds:
    pad: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    lvr_start: int
    lvr: int
    lvr_end: int

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int) -> "TokenIds":
        lvr = add_lvr_tokens(tokenizer, vocab_size)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        names = dict(im_start="<|im_start|>", im_end="<|im_end|>", vision_start="<|vision_start|>",
                     vision_end="<|vision_end|>", image_pad="<|image_pad|>")
        return cls(pad=tokenizer.pad_token_id, **{k: _single_id(tokenizer, t) for k, t in names.items()},
                   lvr_start=lvr["<|lvr_start|>"], lvr=lvr["<|lvr|>"], lvr_end=lvr["<|lvr_end|>"])


def load_hf_processing(hf_dir):
    """(tokenizer, image_processor, vocab_size) from a Hugging Face Qwen2.5-VL checkpoint dir."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(hf_dir)
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    vocab = cfg.get("text_config", {}).get("vocab_size") or cfg.get("vocab_size")
    if not vocab:
        raise ValueError(f"{hf_dir}/config.json has no vocab_size")
    return proc.tokenizer, proc.image_processor, int(vocab)


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
        t, enc = self.ids, self.tokenizer.encode
        ids, sup, latent = [], [], []

        def add(tokens, s=False):
            ids.extend(tokens)
            sup.extend([s] * len(tokens))

        def text(s, supervised=False):
            if s:
                add(enc(s, add_special_tokens=False), supervised)

        merged = [gt * gh * gw // self.merge ** 2 for gt, gh, gw in grids]
        offsets = np.concatenate([[0], np.cumsum(merged)]).tolist()
        turns = list(rec.turns)
        system = turns.pop(0)[1] if turns[0][0] == "system" else self._system
        add([t.im_start])
        text("system\n" + system)
        add([t.im_end] + self._header["nl"])
        images, boxes = iter(range(len(grids))), iter(rec.boxes)
        for role, value in turns:
            add([t.im_start])
            if role == "user":
                for j, part in enumerate(value.split(IMAGE_PLACEHOLDER)):
                    if j:
                        add([t.vision_start] + [t.image_pad] * merged[next(images)] + [t.vision_end])
                    text("user\n" + part if j == 0 else part)
            else:
                add(self._header["assistant"])
                for j, part in enumerate(value.split(LVR_PLACEHOLDER)):
                    if j:
                        k, xyxy = next(boxes)
                        idx = bbox_token_indices(xyxy, grids[k][1:], self.merge)
                        latent.extend(offsets[k] + i for i in idx)
                        add([t.lvr_start] + [t.lvr] * len(idx) + [t.lvr_end], True)
                    text(part, True)
            add([t.im_end], role == "assistant")
            add(self._header["nl"])
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

        keep = []
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for i, (rec, got) in enumerate(pool.map(sizes, range(len(self.records)))):
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
