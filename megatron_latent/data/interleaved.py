"""HyLaR SFT data: Zebra-CoT rows (parquet) -> prepared samples and padded micro-batches.

Layout (Qwen2.5 chat format, tokenised piece by piece so every id's role is known):

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{question without placeholders}<|vision_start|><|image_pad|>*n<|vision_end|>...
        <|im_end|>\\n
    <|im_start|>assistant\\n<think>t1</think>\\n<|canvas_start|><|canvas|>*16<|canvas_end|>\\n
        <think>t2</think>...<answer>A</answer><|im_end|>\\n

as HyLaR's `zebra_cot_preprocess_function` + `process_batch` render it (row parsing and the
shared layout: zebra_cot.py): each reasoning image is "\\n", a canvas span, "\\n". Problem images
go to the Qwen ViT, reasoning images only to SigLIP (`canvas_pixel_values`).

CE-supervised targets: the assistant content and its `<|im_end|>`, except targets equal to
`<|canvas|>` (so `<|canvas_end|>` is predicted from the last canvas slot). Unlike HyLaR, the
"\\n" after "assistant" and after `<|im_end|>` are not supervised (as in LvrSftDataset).
"""

from __future__ import annotations

import torch

from megatron_latent.data.collate import pad_rows
from megatron_latent.data.zebra_cot import (  # noqa: F401  (parquet_files, split_trace: re-exported)
    CHAT_RESERVED, DEFAULT_SYSTEM, HYLAR_EXCLUDE, HYLAR_MAX_PIXELS, HYLAR_MIN_PIXELS, Parsed,
    ZebraCotRows, _File, parquet_files, split_trace)

CANVAS_TOKENS = ("<|canvas|>", "<|canvas_start|>", "<|canvas_end|>")  # HyLaR's add order (ids)
RESERVED = CHAT_RESERVED + CANVAS_TOKENS


class ZebraCotDataset(ZebraCotRows):
    """Samples: input_ids/labels [L] long, loss_mask [L] float, pixel_values [n_patches, 1176] and
    image_grid_thw [n_problem, 3] (problem images), canvas_pixel_values [n_reasoning, 3, S, S]
    (SigLIP's processor), source (file, row). Bad rows: see ZebraCotRows."""

    reserved = RESERVED

    def __init__(self, data_path, *, tokenizer, image_processor, canvas_processor, vocab_size: int,
                 seq_length: int | None, canvas_tokens: int = 16, min_pixels: int = HYLAR_MIN_PIXELS,
                 max_pixels: int = HYLAR_MAX_PIXELS, skip_bad: bool = False, scan: bool | None = None,
                 scan_workers: int = 16, system_prompt: str = DEFAULT_SYSTEM, include=None,
                 exclude=HYLAR_EXCLUDE, cache_row_groups: int = 2):
        self.canvas_processor, self.canvas_tokens = canvas_processor, canvas_tokens
        super().__init__(data_path, tokenizer=tokenizer, image_processor=image_processor,
                         vocab_size=vocab_size, seq_length=seq_length, extra_tokens=CANVAS_TOKENS,
                         min_pixels=min_pixels, max_pixels=max_pixels, skip_bad=skip_bad,
                         scan=scan, scan_workers=scan_workers, system_prompt=system_prompt,
                         include=include, exclude=exclude, cache_row_groups=cache_row_groups)

    @classmethod
    def from_hf_dir(cls, data_path, hf_dir, siglip_dir, **kwargs) -> "ZebraCotDataset":
        """Tokenizer (HyLaR's tokens added), Qwen image processor and vocab_size from a Qwen2.5-VL
        checkpoint dir; the canvas image processor from a local SigLIP dir."""
        from transformers import SiglipImageProcessor

        from megatron_latent.data.lvr_tokens import load_hf_processing
        from megatron_latent.latent.tokens import add_tokens

        tokenizer, image_processor, vocab_size = load_hf_processing(hf_dir)
        add_tokens(tokenizer, CANVAS_TOKENS, vocab_size, special=False)
        canvas = SiglipImageProcessor.from_pretrained(str(siglip_dir), local_files_only=True)
        return cls(data_path, tokenizer=tokenizer, image_processor=image_processor,
                   canvas_processor=canvas, vocab_size=vocab_size, **kwargs)

    def _missing_tokens_hint(self, missing: list[str]) -> str:
        return (f"the tokenizer lacks HyLaR's tokens {missing}: add them first "
                "(latent.tokens.add_tokens(tok, CANVAS_TOKENS, vocab_size, special=False))")

    # ---- samples ----------------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict:
        f, row, parsed, problem, reasoning = self._load(i)
        grids = [self._grid(f, row, c, im.size) for c, im in zip(parsed.problem, problem)]
        ids, sup = self._layout(f, row, parsed, grids)
        pixels, thw = self._qwen_pixels(f, row, problem, grids)
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.cat([input_ids[1:], input_ids.new_full((1,), self.ids["pad"])])
        target_sup = torch.tensor(sup[1:] + [False]) & (labels != self.ids["<|canvas|>"])
        return {"input_ids": input_ids, "labels": labels, "loss_mask": target_sup.float(),
                "pixel_values": pixels, "image_grid_thw": thw,
                "canvas_pixel_values": self._canvas_pixels(reasoning), "source": (str(f.path), row)}

    def _layout(self, f: _File, row: int, parsed: Parsed, grids):
        """Tokens and assistant flags, checked against seq_length."""
        t = self.ids
        span = [t["<|canvas_start|>"]] + [t["<|canvas|>"]] * self.canvas_tokens + [t["<|canvas_end|>"]]
        ids, sup = self._encode(parsed, grids, lambda k: span)
        n_img = sum(self.merged_tokens(g) for g in grids)
        self._check_length(f, row, len(ids), f" ({n_img} image tokens, "
                           f"{ids.count(t['<|canvas|>'])} canvas tokens)")
        return ids, sup

    def _plan(self, f, row, parsed, problem_sizes, reasoning_sizes) -> None:
        self._layout(f, row, parsed, [self._grid(f, row, c, s)
                                      for c, s in zip(parsed.problem, problem_sizes)])

    def _canvas_pixels(self, images) -> torch.Tensor:
        if not images:
            size = self.canvas_processor.size
            return torch.zeros(0, 3, size["height"], size["width"])
        return self.canvas_processor(images=images, do_convert_rgb=True,
                                     return_tensors="pt")["pixel_values"]

    # ---- batches ----------------------------------------------------------------------------
    def collate(self, samples: list[dict], pad_to: int | None = None) -> dict:
        """Micro-batch: input_ids, labels [b, s] long (pad id after each sample); loss_mask [b, s]
        float32; attention_mask [b, s] long; position_ids [3, b, s] (mRoPE, padding 0);
        pixel_values [sum n_patches, 1176], image_grid_thw [n_problem, 3] (sample order);
        latent_mask [b, s] bool (<|canvas|> slots, b-major = the order of canvas_pixel_values
        [n_reasoning, 3, S, S] x canvas_tokens); sources."""
        from megatron_latent.models.qwen25vl.rope_index import rope_index

        if not samples:
            raise ValueError("collate needs at least one sample")
        input_ids, labels, loss_mask, attention_mask = pad_rows(samples, self.ids["pad"], pad_to)
        latent_mask = (input_ids == self.ids["<|canvas|>"]) & attention_mask.bool()
        canvas = torch.cat([x["canvas_pixel_values"] for x in samples])
        per_sample = latent_mask.sum(1).tolist()
        want = [self.canvas_tokens * len(x["canvas_pixel_values"]) for x in samples]
        if per_sample != want or int(latent_mask.sum()) != self.canvas_tokens * len(canvas):
            bad = [x["source"] for x, n, w in zip(samples, per_sample, want) if n != w]
            raise ValueError(f"<|canvas|> slots {per_sample} != {self.canvas_tokens} x reasoning "
                             f"images {[len(x['canvas_pixel_values']) for x in samples]} in samples {bad}")
        image_grid_thw = torch.cat([x["image_grid_thw"] for x in samples]).long()
        position_ids, _ = rope_index(input_ids, image_grid_thw, image_token_id=self.ids["<|image_pad|>"],
                                     spatial_merge_size=self.merge, attention_mask=attention_mask)
        return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
                "attention_mask": attention_mask, "position_ids": position_ids,
                "pixel_values": torch.cat([x["pixel_values"] for x in samples]),
                "image_grid_thw": image_grid_thw, "latent_mask": latent_mask,
                "canvas_pixel_values": canvas, "sources": [x["source"] for x in samples]}

    def pack(self, samples: list[dict], pad_to_multiple: int = 8) -> dict:
        raise NotImplementedError("packing is not supported for ZebraCotDataset (HyLaR) yet: "
                                  "use padded micro-batches (collate), i.e. no --pack")

