"""DeepLatent SFT data (docs/deeplatent.md, spec 2.3-2.6): Zebra-CoT rows (zebra_cot.py) in two
stages over the same records, kept or skipped identically so `sample_id` and each block's grid
line up between the stage-1 teacher and the stage-2 student.

Stage 1: each reasoning image is a real image in the assistant turn, "\\n"
`<|vision_start|><|image_pad|>*(H*W)<|vision_end|>` "\\n", resized so its merged grid (H, W) is
at most 16 x 16 (`assistant_grid`). Its pads are the teacher slots; they are not CE targets.

Stage 2: the same image becomes "\\n" `<latent> <|latent_scale|> <|latent_qmod|> <|latent_imod|>
<|latent_pad|>*(H*W) </latent>` "\\n" with the same (H, W), computed from the image size (no ViT),
so slot p of block k is teacher slot p of image k. CE targets: text, `<|im_end|>`, `<latent>`.

Samples (dicts): input_ids, labels [L] long, loss_mask [L] float, pixel_values [n_patches, 1176]
and image_grid_thw [n, 3] (stage 1: question then assistant images, in sequence order; stage 2:
question images), teacher_grids [(H, W)] per reasoning image, sample_id, source (file, row);
stage 1 adds teacher_mask [L] bool, stage 2 latent_mask [L] bool. Batches: deeplatent_batch.py.
"""

from __future__ import annotations

import torch

from megatron_latent.data import deeplatent_batch as batch
from megatron_latent.data.deeplatent_tokens import END, IMOD, LATENT_TOKENS, PAD, QMOD, SCALE, START
from megatron_latent.data.errors import DataError
from megatron_latent.data.zebra_cot import (CHAT_RESERVED, DEFAULT_SYSTEM, HYLAR_EXCLUDE,
                                            HYLAR_MAX_PIXELS, HYLAR_MIN_PIXELS, TRACE,
                                            Parsed, ZebraCotRows, _File)

MAX_GRID, MAX_BLOCKS = 16, 5  # grid side and blocks per response (paper)


def assistant_grid(size, patch: int = 14, merge: int = 2, max_grid: int = MAX_GRID):
    """The patch grid (1, 2H, 2W) of an assistant image of (w, h) pixels: its longer side scaled
    down to at most max_grid * 28 = 448 px (aspect kept), then smart_resize to multiples of 28.
    A pixel bound alone cannot keep both sides <= 16 merged tokens for a long, thin image.
    ValueError for an aspect ratio over 200 (smart_resize's)."""
    from qwen_vl_utils import smart_resize

    factor, w, h = patch * merge, *size
    scale = min(1.0, max_grid * factor / max(w, h))
    rh, rw = smart_resize(max(1, round(h * scale)), max(1, round(w * scale)), factor=factor,
                          min_pixels=factor ** 2, max_pixels=(max_grid * factor) ** 2)
    return 1, rh // patch, rw // patch


class DeepLatentDataset(ZebraCotRows):
    """Stage `stage` (1 or 2) samples of Zebra-CoT rows (module docstring). Besides ZebraCotRows'
    named errors, rows with more than `max_blocks` reasoning images ("too_many_blocks") are bad
    in both stages, and `seq_length` bounds the longer stage-2 layout in both.
    `latent_positions`: "image" (spec 2.5) or "text" (the LVR/HyLaR convention) mRoPE for grid
    slots in stage 2."""

    reserved = CHAT_RESERVED + LATENT_TOKENS

    def __init__(self, data_path, *, stage: int, tokenizer, image_processor, vocab_size: int,
                 seq_length: int | None, max_blocks: int = MAX_BLOCKS,
                 latent_positions: str = "image", min_pixels: int = HYLAR_MIN_PIXELS,
                 max_pixels: int = HYLAR_MAX_PIXELS, skip_bad: bool = False,
                 scan: bool | None = None, scan_workers: int = 16,
                 system_prompt: str = DEFAULT_SYSTEM, include=None, exclude=HYLAR_EXCLUDE,
                 cache_row_groups: int = 2):
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        if latent_positions not in ("image", "text"):
            raise ValueError(f"latent_positions must be 'image' or 'text', got {latent_positions!r}")
        self.stage, self.max_blocks, self.latent_positions = stage, max_blocks, latent_positions
        super().__init__(data_path, tokenizer=tokenizer, image_processor=image_processor,
                         vocab_size=vocab_size, seq_length=seq_length, extra_tokens=LATENT_TOKENS,
                         min_pixels=min_pixels, max_pixels=max_pixels, skip_bad=skip_bad,
                         scan=scan, scan_workers=scan_workers, system_prompt=system_prompt,
                         include=include, exclude=exclude, cache_row_groups=cache_row_groups)

    @classmethod
    def from_hf_dir(cls, data_path, hf_dir, *, stage: int, **kwargs) -> "DeepLatentDataset":
        """Tokenizer (the 6 tokens added), Qwen image processor and vocab_size from a
        Qwen2.5-VL checkpoint dir."""
        from megatron_latent.data.lvr_tokens import load_hf_processing
        from megatron_latent.latent.tokens import add_tokens

        tokenizer, image_processor, vocab_size = load_hf_processing(hf_dir)
        add_tokens(tokenizer, LATENT_TOKENS, vocab_size, special=False)
        return cls(data_path, stage=stage, tokenizer=tokenizer, image_processor=image_processor,
                   vocab_size=vocab_size, **kwargs)

    def _missing_tokens_hint(self, missing: list[str]) -> str:
        return (f"the tokenizer lacks DeepLatent's tokens {missing}: add them first "
                "(latent.tokens.add_tokens(tok, LATENT_TOKENS, vocab_size, special=False))")

    # ---- samples ----------------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict:
        f, row, parsed, problem, reasoning = self._load(i)
        q_grids = [self._grid(f, row, c, im.size) for c, im in zip(parsed.problem, problem)]
        a_grids = [self._assistant_grid(f, row, c, im.size)
                   for c, im in zip(parsed.reasoning, reasoning)]
        ids, sup = self._layout(f, row, parsed, q_grids, a_grids)
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.cat([input_ids[1:], input_ids.new_full((1,), self.ids["pad"])])
        assistant = torch.tensor(sup)
        target = torch.tensor(sup[1:] + [False]) & ~torch.isin(labels, self._untargeted())
        out = {"input_ids": input_ids, "labels": labels, "loss_mask": target.float(),
               "teacher_grids": [(gh // self.merge, gw // self.merge) for _, gh, gw in a_grids],
               "sample_id": self.sample_id(f, row), "source": (str(f.path), row)}
        if self.stage == 1:
            pixels, thw = self._qwen_pixels(f, row, problem + reasoning, q_grids + a_grids)
            out["teacher_mask"] = (input_ids == self.ids["<|image_pad|>"]) & assistant
        else:
            pixels, thw = self._qwen_pixels(f, row, problem, q_grids)
            out["latent_mask"] = input_ids == self.ids[PAD]
        return out | {"pixel_values": pixels, "image_grid_thw": thw}

    def _untargeted(self) -> torch.Tensor:
        """Ids that are never CE targets: stage 1 the image pads (question pads are in the user
        turn anyway); stage 2 everything of a block but `<latent>` (forced at inference)."""
        names = ("<|image_pad|>",) if self.stage == 1 else (END, SCALE, QMOD, IMOD, PAD)
        return torch.tensor([self.ids[n] for n in names])

    def _assistant_grid(self, f: _File, row: int, column: str, size):
        try:
            return assistant_grid(size, self.patch, self.merge)
        except ValueError as e:  # aspect ratio over 200
            raise DataError(f.path, row, column, str(e), "image") from e

    def _span(self, grid) -> list[int]:
        """The tokens an assistant image of patch grid `grid` becomes in this stage."""
        t, n = self.ids, self.merged_tokens(grid)
        if self.stage == 1:
            return [t["<|vision_start|>"]] + [t["<|image_pad|>"]] * n + [t["<|vision_end|>"]]
        return [t[START], t[SCALE], t[QMOD], t[IMOD]] + [t[PAD]] * n + [t[END]]

    def _layout(self, f: _File, row: int, parsed: Parsed, q_grids, a_grids):
        """Tokens and assistant flags of this stage; the record checks of both stages."""
        if len(parsed.reasoning) > self.max_blocks:
            raise DataError(f.path, row, TRACE, f"{len(parsed.reasoning)} reasoning images > "
                            f"{self.max_blocks} latent blocks per sample", "too_many_blocks")
        ids, sup = self._encode(parsed, q_grids, lambda k: self._span(a_grids[k]))
        longer = len(ids) + (3 * len(a_grids) if self.stage == 1 else 0)  # stage 2: 3 more a block
        slots = sum(self.merged_tokens(g) for g in a_grids)
        self._check_length(f, row, longer, f" in the stage-2 layout ({len(a_grids)} blocks of "
                           f"{slots} slots, {sum(map(self.merged_tokens, q_grids))} image tokens)")
        return ids, sup

    def _plan(self, f, row, parsed, problem_sizes, reasoning_sizes) -> None:
        self._layout(f, row, parsed,
                     [self._grid(f, row, c, s) for c, s in zip(parsed.problem, problem_sizes)],
                     [self._assistant_grid(f, row, c, s)
                      for c, s in zip(parsed.reasoning, reasoning_sizes)])

    # ---- batches ----------------------------------------------------------------------------
    def collate(self, samples: list[dict], pad_to: int | None = None) -> dict:
        """Padded micro-batch (deeplatent_batch.collate_stage1 / collate_stage2)."""
        if self.stage == 1:
            return batch.collate_stage1(samples, self.ids, self.merge, pad_to)
        return batch.collate_stage2(samples, self.ids, self.merge, pad_to,
                                    image_like=self.latent_positions == "image")

    def pack(self, samples: list[dict], pad_to_multiple: int = 8) -> dict:
        """Stage 1: one packed row (deeplatent_batch.pack_stage1). Stage 2: not supported."""
        if self.stage == 2:
            raise NotImplementedError("packing is not supported for DeepLatent stage 2 (latent "
                                      "blocks): use padded micro-batches (collate), i.e. no --pack")
        return batch.pack_stage1(samples, self.ids, self.merge, pad_to_multiple)
