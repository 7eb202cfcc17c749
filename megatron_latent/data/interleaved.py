"""HyLaR SFT data: Zebra-CoT rows (parquet) -> prepared samples and padded micro-batches.

Layout (Qwen2.5 chat format, tokenised piece by piece so every id's role is known):

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{question without placeholders}<|vision_start|><|image_pad|>*n<|vision_end|>...
        <|im_end|>\\n
    <|im_start|>assistant\\n<think>t1</think>\\n<|canvas_start|><|canvas|>*16<|canvas_end|>\\n
        <think>t2</think>...<answer>A</answer><|im_end|>\\n

as HyLaR's `zebra_cot_preprocess_function` + `process_batch` render it: the trace is split at
`<image_start>[reasoning_image_k]<image_end>`, text chunks lose their `THOUGHT n:` prefixes and
newlines; each reasoning image is "\\n", a canvas span, "\\n". Problem images go to the Qwen ViT,
reasoning images only to SigLIP (`canvas_pixel_values`).

CE-supervised targets: the assistant content and its `<|im_end|>`, except targets equal to
`<|canvas|>` (so `<|canvas_end|>` is predicted from the last canvas slot). Unlike HyLaR, the
"\\n" after "assistant" and after `<|im_end|>` are not supervised (as in LvrSftDataset).

Rows are indexed at construction (text columns held as Arrow arrays); images are read on demand,
one parquet row group at a time (a small cache serves neighbouring rows: random access costs one
row-group read per sample).
"""

from __future__ import annotations

import io
import logging
import re
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from megatron_latent.data import chat
from megatron_latent.data.collate import pad_rows
from megatron_latent.data.errors import DataError, tally_skips
from megatron_latent.latent.tokens import single_id

logger = logging.getLogger(__name__)

CANVAS_TOKENS = ("<|canvas|>", "<|canvas_start|>", "<|canvas_end|>")  # HyLaR's add order (ids)
HYLAR_EXCLUDE = ("3D", "Chemistry", "Competitive", "Graph", "Physics", "ARC-AGI", "Ciphers",
                 "Tetris", "Connect")
DEFAULT_SYSTEM = "You are a helpful assistant."
HYLAR_MIN_PIXELS, HYLAR_MAX_PIXELS = 128 * 28 * 28, 8192 * 28 * 28
QUESTION, TRACE, ANSWER = "Question", "Text Reasoning Trace", "Final Answer"
_PROBLEM = re.compile(r"<image_start>\[(problem_image_\d+)\]<image_end>")
_REASONING = re.compile(r"<image_start>\[(reasoning_image_\d+)\]<image_end>")
_IMAGE_COL = re.compile(r"(problem|reasoning)_image_\d+")
_THOUGHT = re.compile(r"THOUGHT \d+:\s*")
# literal token strings that would corrupt the layout if they reached the tokenizer from text
RESERVED = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>") + CANVAS_TOKENS


def parquet_files(path, include=None, exclude=HYLAR_EXCLUDE) -> list[Path]:
    """A parquet file, or a directory's parquet files: its own and those of each sub-task folder
    whose name contains some `include` substring (None: all) and no `exclude` substring."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such parquet file or directory")
    files = sorted(path.glob("*.parquet"))
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        if (include is None or any(s in sub.name for s in include)) and \
                not any(s in sub.name for s in exclude or ()):
            files += sorted(sub.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{path}: no parquet files (include={include}, exclude={exclude})")
    return files


def split_trace(trace: str) -> list[tuple[str, str]]:
    """[("think", text) | ("image", column)] in order, as HyLaR's parse_reasoning_trace."""
    parts = []
    for j, seg in enumerate(_REASONING.split(trace)):
        if j % 2:
            parts.append(("image", seg))
        elif seg := _THOUGHT.sub("", seg.strip()):
            parts.append(("think", seg.replace("\n\n", " ").replace("\n", " ")))
    return parts


class Parsed(NamedTuple):
    text: str  # the question, problem placeholders removed
    problem: list[str]  # problem image columns, in order of appearance
    parts: list[tuple[str, str]]  # the assistant's ("think" | "image" | "answer", text or column)
    reasoning: list[str]  # reasoning image columns, in order of appearance


class _File:
    """One parquet file: text columns in memory, image columns read per row group."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path, meta = path, pq.ParquetFile(path).metadata
        names = pq.read_schema(path).names
        if missing := [c for c in (QUESTION, TRACE, ANSWER) if c not in names]:
            raise DataError(path, None, missing[0], f"missing column(s) {missing}; has {names}",
                            "column")
        self.image_columns = [c for c in names if _IMAGE_COL.fullmatch(c)]
        self.text = pq.read_table(path, columns=[QUESTION, TRACE, ANSWER])
        self.n = meta.num_rows
        self.group_start = np.cumsum([0] + [meta.row_group(g).num_rows
                                             for g in range(meta.num_row_groups)])

    def row_text(self, row: int) -> tuple:
        return tuple(self.text.column(c)[row].as_py() for c in (QUESTION, TRACE, ANSWER))


class ZebraCotDataset(Dataset):
    """Samples: input_ids/labels [L] long, loss_mask [L] float, pixel_values [n_patches, 1176] and
    image_grid_thw [n_problem, 3] (problem images), canvas_pixel_values [n_reasoning, 3, S, S]
    (SigLIP's processor), source (file, row).

    Bad rows raise DataError in __getitem__, or at construction when `scan` (default: when
    `skip_bad`; images fully decoded by `scan_workers` threads). `skip_bad` leaves them out and
    counts them by reason in `self.skipped`. A file without a text column always raises."""

    def __init__(self, data_path, *, tokenizer, image_processor, canvas_processor, vocab_size: int,
                 seq_length: int | None, canvas_tokens: int = 16, min_pixels: int = HYLAR_MIN_PIXELS,
                 max_pixels: int = HYLAR_MAX_PIXELS, skip_bad: bool = False, scan: bool | None = None,
                 scan_workers: int = 16, system_prompt: str = DEFAULT_SYSTEM, include=None,
                 exclude=HYLAR_EXCLUDE, cache_row_groups: int = 2):
        from qwen_vl_utils.vision_process import SPATIAL_MERGE_SIZE

        self.tokenizer, self.image_processor, self.canvas_processor = (
            tokenizer, image_processor, canvas_processor)
        self.patch, self.merge = image_processor.patch_size, image_processor.merge_size
        self.temporal = image_processor.temporal_patch_size
        if self.merge != SPATIAL_MERGE_SIZE:
            raise ValueError(f"merge_size {self.merge} != qwen_vl_utils' {SPATIAL_MERGE_SIZE}")
        self.seq_length, self.min_pixels, self.max_pixels = seq_length, min_pixels, max_pixels
        self.canvas_tokens, self._system = canvas_tokens, system_prompt
        self.ids = self._token_ids(tokenizer, vocab_size)
        self._header = {t: tokenizer.encode(t, add_special_tokens=False) for t in ("assistant\n", "\n")}
        self._chat = chat.ChatTokens.from_tokenizer(tokenizer)
        self.files = [_File(f) for f in parquet_files(data_path, include, exclude)]
        self._file_start = np.cumsum([0] + [f.n for f in self.files])
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = max(1, cache_row_groups)
        self.skipped: dict[str, int] = {}
        self.skip_examples: dict[str, str] = {}
        keep = np.arange(self._file_start[-1], dtype=np.int64)
        errors: list[DataError] = []
        if skip_bad if scan is None else scan:
            keep = self._scan(errors, scan_workers, raise_first=not skip_bad)
        self._keep = keep
        tally_skips(errors, len(keep), data_path, "rows", self.skipped, self.skip_examples,
                    logger)

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

    @staticmethod
    def _token_ids(tokenizer, vocab_size: int) -> dict[str, int]:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        missing = [t for t in CANVAS_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"the tokenizer lacks HyLaR's tokens {missing}: add them first "
                             "(latent.tokens.add_tokens(tok, CANVAS_TOKENS, vocab_size, special=False))")
        names = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
        ids = {t: single_id(tokenizer, t) for t in names + CANVAS_TOKENS}
        if too_big := {t: i for t, i in ids.items() if i >= vocab_size}:
            raise ValueError(f"token ids {too_big} are >= vocab_size {vocab_size}")
        return {**ids, "pad": tokenizer.pad_token_id}

    # ---- access -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._keep)

    def _locate(self, i: int) -> tuple[_File, int]:
        g = int(self._keep[i])
        f = int(np.searchsorted(self._file_start, g, side="right")) - 1
        return self.files[f], g - int(self._file_start[f])

    def __getitem__(self, i: int) -> dict:
        f, row = self._locate(i)
        parsed = self._parse(f, row)
        cols = parsed.problem + parsed.reasoning
        images = [self._decode(f, row, c, v) for c, v in zip(cols, self._image_values(f, row, cols))]
        problem, reasoning = images[:len(parsed.problem)], images[len(parsed.problem):]
        grids = [self._grid(f, row, c, im.size) for c, im in zip(parsed.problem, problem)]
        ids, sup = self._encode(parsed, grids)
        self._check_length(f, row, ids, grids)
        pixels, thw = self._qwen_pixels(f, row, problem, grids)
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.cat([input_ids[1:], input_ids.new_full((1,), self.ids["pad"])])
        target_sup = torch.tensor(sup[1:] + [False]) & (labels != self.ids["<|canvas|>"])
        return {"input_ids": input_ids, "labels": labels, "loss_mask": target_sup.float(),
                "pixel_values": pixels, "image_grid_thw": thw,
                "canvas_pixel_values": self._canvas_pixels(reasoning), "source": (str(f.path), row)}

    # ---- rows -------------------------------------------------------------------------------
    def _parse(self, f: _File, row: int) -> Parsed:
        question, trace, answer = f.row_text(row)
        for name, v in ((QUESTION, question), (TRACE, trace), (ANSWER, answer)):
            if v is None:
                raise DataError(f.path, row, name, "is null", "missing")
            if bad := [t for t in RESERVED if t in v]:
                raise DataError(f.path, row, name, f"contains reserved token text {bad}", "reserved")
        problem = _PROBLEM.findall(question)
        text = _PROBLEM.sub("", question)
        parts = split_trace(trace) + [("answer", answer)]
        reasoning = [c for kind, c in parts if kind == "image"]
        for name, leftover in ((QUESTION, text), (TRACE, _REASONING.sub("", trace))):
            if "<image_start>" in leftover:
                raise DataError(f.path, row, name, "has an image placeholder of the wrong kind "
                                "(problem images belong in the question, reasoning images in the "
                                "trace) or a malformed one", "placeholder")
        # stripped: the question as a user types it at generation (build_prompt), not with the
        # space that stood before a removed placeholder
        return Parsed(text.strip(), problem, parts, reasoning)

    def _image_values(self, f: _File, row: int, columns) -> list:
        g = int(np.searchsorted(f.group_start, row, side="right")) - 1
        key = (str(f.path), g)
        if key not in self._cache:
            import pyarrow.parquet as pq

            self._cache[key] = pq.ParquetFile(f.path).read_row_group(g, columns=f.image_columns)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        table, r = self._cache[key], row - int(f.group_start[g])
        present = {c for c in f.image_columns if table.column(c)[r].is_valid}
        for c in columns:
            if c not in present:
                raise DataError(f.path, row, c, "a placeholder refers to this image, but it is "
                                f"{'null' if c in f.image_columns else 'not a column'}", "image_count")
        if extra := sorted(present - set(columns)):
            raise DataError(f.path, row, extra[0], f"images {extra} have no placeholder "
                            f"({len(present)} images, {len(set(columns))} referenced)", "image_count")
        return [table.column(c)[r].as_py() for c in columns]

    @staticmethod
    def _decode(f: _File, row: int, column: str, value) -> Image.Image:
        """An HF Image struct {"bytes", "path"} (or raw bytes) -> decoded image. The processors
        make it RGB (qwen_vl_utils' to_rgb, SigLIP's do_convert_rgb), as in HyLaR. A `path` is
        used only without bytes, and only inside the parquet file's folder."""
        try:
            data, rel = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
            if not data and not rel:
                raise ValueError("neither bytes nor path")
            if not data and (Path(rel).is_absolute() or ".." in Path(rel).parts):
                raise ValueError(f"path {rel!r} leaves the folder of the parquet file")
            src = io.BytesIO(data) if data else f.path.parent / rel
            if not data and not src.is_file():
                raise FileNotFoundError(f"{src} is not a regular file")
            with Image.open(src) as im:
                im.load()
                return im
        except Exception as e:  # truncated, not an image, missing file, decompression bomb, ...
            raise DataError(f.path, row, column, f"cannot decode: {type(e).__name__}: {e}",
                            "image") from e

    # ---- pixels -----------------------------------------------------------------------------
    def _grid(self, f: _File, row: int, column: str, size) -> tuple[int, int, int]:
        from qwen_vl_utils import smart_resize

        w, h = size
        try:
            rh, rw = smart_resize(h, w, factor=self.patch * self.merge,
                                  min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        except ValueError as e:  # aspect ratio over 200
            raise DataError(f.path, row, column, str(e), "image") from e
        return 1, rh // self.patch, rw // self.patch

    def _qwen_pixels(self, f: _File, row: int, images, grids):
        from qwen_vl_utils import fetch_image

        if not images:
            return (torch.zeros(0, 3 * self.temporal * self.patch ** 2),
                    torch.zeros(0, 3, dtype=torch.long))
        resized = [fetch_image({"image": im, "min_pixels": self.min_pixels,
                                "max_pixels": self.max_pixels}, image_patch_size=self.patch)
                   for im in images]
        out = self.image_processor(images=resized, do_resize=False, return_tensors="pt")
        if out["image_grid_thw"].tolist() != [list(g) for g in grids]:
            raise RuntimeError(f"{f.path}: row {row}: image processor grids "
                               f"{out['image_grid_thw'].tolist()} != planned {grids}")
        return out["pixel_values"], out["image_grid_thw"].long()

    def _canvas_pixels(self, images) -> torch.Tensor:
        if not images:
            size = self.canvas_processor.size
            return torch.zeros(0, 3, size["height"], size["width"])
        return self.canvas_processor(images=images, do_convert_rgb=True,
                                     return_tensors="pt")["pixel_values"]

    # ---- tokens -----------------------------------------------------------------------------
    def _encode(self, parsed, grids) -> tuple[list[int], list[bool]]:
        """Token ids and per-token "assistant-turn token" flags."""
        t = self.ids
        merged = [gt * gh * gw // self.merge ** 2 for gt, gh, gw in grids]
        # the prompt as generation builds it for this method (text first): data/chat.py
        pieces = chat.prompt_pieces(self._chat, parsed.text, merged, system=self._system,
                                    images_first=False)[:-1]
        span = [t["<|canvas_start|>"]] + [t["<|canvas|>"]] * self.canvas_tokens + [t["<|canvas_end|>"]]
        for kind, value in parsed.parts:
            if kind == "image":
                pieces += [("\n", True), (span, True), ("\n", True)]
            else:
                tag = "think" if kind == "think" else "answer"
                pieces.append((f"<{tag}>{value}</{tag}>", True))
        pieces += [([t["<|im_end|>"]], True), (self._header["\n"], False)]
        merged_pieces = []  # adjacent texts are tokenised together, as in the rendered chat text
        for p, s in pieces:
            if isinstance(p, str) and merged_pieces and isinstance(merged_pieces[-1][0], str) \
                    and merged_pieces[-1][1] == s:
                merged_pieces[-1] = (merged_pieces[-1][0] + p, s)
            else:
                merged_pieces.append((p, s))
        return chat.tokenize(self.tokenizer, merged_pieces)

    def _check_length(self, f: _File, row: int, ids, grids) -> None:
        if self.seq_length is not None and len(ids) > self.seq_length:
            n_img = sum(gt * gh * gw for gt, gh, gw in grids) // self.merge ** 2
            raise DataError(f.path, row, TRACE, f"sample has {len(ids)} tokens > seq_length "
                            f"{self.seq_length} ({n_img} image tokens, "
                            f"{ids.count(self.ids['<|canvas|>'])} canvas tokens)", "too_long")

    # ---- up-front scan ----------------------------------------------------------------------
    def _scan(self, errors: list, workers: int, raise_first: bool) -> np.ndarray:
        """Decode every referenced image (threads; PIL decodes without the GIL) and tokenise every
        row (this thread: HF tokenizers are not safe to share between threads), row group by row
        group in file order."""
        def sizes(item):
            f, row, parsed, values = item
            if isinstance(parsed, DataError):
                return parsed
            try:
                return [self._decode(f, row, c, v).size
                        for c, v in zip(parsed.problem + parsed.reasoning, values)]
            except DataError as e:
                return e

        keep = []
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for fi, f in enumerate(self.files):
                for g in range(len(f.group_start) - 1):
                    items = []
                    for row in range(int(f.group_start[g]), int(f.group_start[g + 1])):
                        try:
                            parsed = self._parse(f, row)
                            values = self._image_values(f, row, parsed.problem + parsed.reasoning)
                            items.append((f, row, parsed, values))
                        except DataError as e:
                            items.append((f, row, e, None))
                    for (_, row, parsed, _), got in zip(items, pool.map(sizes, items)):
                        try:
                            if isinstance(got, DataError):
                                raise got
                            grids = [self._grid(f, row, c, s) for c, s in zip(parsed.problem, got)]
                            self._check_length(f, row, self._encode(parsed, grids)[0], grids)
                            keep.append(int(self._file_start[fi]) + row)
                        except DataError as e:
                            if raise_first:
                                raise
                            errors.append(e)
        return np.asarray(keep, dtype=np.int64)

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
