"""Zebra-CoT rows (parquet) for interleaved-reasoning SFT, shared by HyLaR (interleaved.py: reasoning
images become canvas spans) and DeepLatent (deeplatent_data.py: real assistant images, or latent
blocks). This module reads and checks rows; a subclass decides what a reasoning image becomes.

A row: "Question" with `<image_start>[problem_image_k]<image_end>` placeholders, "Text Reasoning
Trace" with `THOUGHT n:` chunks and `<image_start>[reasoning_image_k]<image_end>` placeholders,
"Final Answer", and image columns (HF Image structs {"bytes", "path"}). The assistant turn is
rendered as HyLaR's `zebra_cot_preprocess_function` does: text chunks lose their `THOUGHT n:`
prefixes and newlines and become `<think>..</think>`; each reasoning image is "\\n", its span,
"\\n"; then `<answer>A</answer><|im_end|>`. Problem images go to the user turn, after the question.

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
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from megatron_latent.data import chat
from megatron_latent.data.errors import DataError, tally_skips
from megatron_latent.latent.tokens import single_id

logger = logging.getLogger(__name__)

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
CHAT_RESERVED = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
CHAT_NAMES = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


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


class ZebraCotRows(Dataset):
    """Row access, parsing, image decoding, question-image grids and pixels, the up-front scan
    and skip counting. A subclass sets `reserved` (its token texts are banned from row text) and
    implements `_plan` (build the row's tokens from its image sizes, raise DataError if the row
    cannot be used: the scan calls it for every row) and `__getitem__` (usually via `_load`).

    Bad rows raise DataError in __getitem__, or at construction when `scan` (default: when
    `skip_bad`; images fully decoded by `scan_workers` threads). `skip_bad` leaves them out and
    counts them by reason in `self.skipped`. A file without a text column always raises."""

    reserved: tuple[str, ...] = CHAT_RESERVED

    def __init__(self, data_path, *, tokenizer, image_processor, vocab_size: int,
                 seq_length: int | None, extra_tokens: tuple[str, ...] = (),
                 min_pixels: int = HYLAR_MIN_PIXELS, max_pixels: int = HYLAR_MAX_PIXELS,
                 skip_bad: bool = False, scan: bool | None = None, scan_workers: int = 16,
                 system_prompt: str = DEFAULT_SYSTEM, include=None, exclude=HYLAR_EXCLUDE,
                 cache_row_groups: int = 2):
        from qwen_vl_utils.vision_process import SPATIAL_MERGE_SIZE

        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.patch, self.merge = image_processor.patch_size, image_processor.merge_size
        self.temporal = image_processor.temporal_patch_size
        if self.merge != SPATIAL_MERGE_SIZE:
            raise ValueError(f"merge_size {self.merge} != qwen_vl_utils' {SPATIAL_MERGE_SIZE}")
        self.seq_length, self.min_pixels, self.max_pixels = seq_length, min_pixels, max_pixels
        self._system = system_prompt
        self.ids = self._token_ids(tokenizer, vocab_size, extra_tokens)
        self._newline = tokenizer.encode("\n", add_special_tokens=False)
        self._chat = chat.ChatTokens.from_tokenizer(tokenizer)
        self.data_path = Path(data_path)
        self._one_file = self.data_path.is_file()
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

    def _missing_tokens_hint(self, missing: list[str]) -> str:
        return f"the tokenizer lacks the method's tokens {missing}: add them first"

    def _token_ids(self, tokenizer, vocab_size: int, extra: tuple[str, ...]) -> dict[str, int]:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        if missing := [t for t in extra if t not in tokenizer.get_vocab()]:
            raise ValueError(self._missing_tokens_hint(missing))
        ids = {t: single_id(tokenizer, t) for t in CHAT_NAMES + tuple(extra)}
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

    def _load(self, i: int) -> tuple[_File, int, Parsed, list, list]:
        """(file, row, parsed, problem images, reasoning images), images decoded."""
        f, row = self._locate(i)
        parsed = self._parse(f, row)
        cols = parsed.problem + parsed.reasoning
        images = [self._decode(f, row, c, v) for c, v in zip(cols, self._image_values(f, row, cols))]
        return f, row, parsed, images[:len(parsed.problem)], images[len(parsed.problem):]

    def sample_id(self, f: _File, row: int) -> str:
        """"{file relative to data_path}#{row}": stable for one data folder whatever the
        include/exclude filters or the folder's location (the DeepLatent teacher-cache key)."""
        name = f.path.name if self._one_file else f.path.relative_to(self.data_path).as_posix()
        return f"{name}#{row}"

    # ---- rows -------------------------------------------------------------------------------
    def _parse(self, f: _File, row: int) -> Parsed:
        question, trace, answer = f.row_text(row)
        for name, v in ((QUESTION, question), (TRACE, trace), (ANSWER, answer)):
            if v is None:
                raise DataError(f.path, row, name, "is null", "missing")
            if bad := [t for t in self.reserved if t in v]:
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
        """A question image's patch grid (1, h, w): qwen_vl_utils' smart_resize in
        [min_pixels, max_pixels] (what fetch_image does)."""
        from qwen_vl_utils import smart_resize

        w, h = size
        try:
            rh, rw = smart_resize(h, w, factor=self.patch * self.merge,
                                  min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        except ValueError as e:  # aspect ratio over 200
            raise DataError(f.path, row, column, str(e), "image") from e
        return 1, rh // self.patch, rw // self.patch

    def _qwen_pixels(self, f: _File, row: int, images, grids):
        """pixel_values [n_patches, 1176] and image_grid_thw [n, 3] of `images`, each resized to
        its planned patch grid (as fetch_image resizes: to_rgb, then PIL's default resampling)."""
        from qwen_vl_utils.vision_process import to_rgb

        if not images:
            return (torch.zeros(0, 3 * self.temporal * self.patch ** 2),
                    torch.zeros(0, 3, dtype=torch.long))
        resized = [to_rgb(im).resize((gw * self.patch, gh * self.patch))
                   for im, (_, gh, gw) in zip(images, grids)]
        out = self.image_processor(images=resized, do_resize=False, return_tensors="pt")
        if out["image_grid_thw"].tolist() != [list(g) for g in grids]:
            raise RuntimeError(f"{f.path}: row {row}: image processor grids "
                               f"{out['image_grid_thw'].tolist()} != planned {grids}")
        return out["pixel_values"], out["image_grid_thw"].long()

    def merged_tokens(self, grid) -> int:
        t, h, w = grid
        return t * h * w // self.merge ** 2

    # ---- tokens -----------------------------------------------------------------------------
    def _encode(self, parsed: Parsed, grids, span: Callable[[int], list[int]]):
        """Token ids and per-token "assistant-turn token" flags of the row, with `grids` the
        question images' patch grids and `span(k)` the token ids that reasoning image k becomes."""
        t = self.ids
        # the prompt as generation builds it for these methods (text first): data/chat.py
        pieces = chat.prompt_pieces(self._chat, parsed.text, [self.merged_tokens(g) for g in grids],
                                    system=self._system, images_first=False)[:-1]
        k = 0
        for kind, value in parsed.parts:
            if kind == "image":
                pieces += [("\n", True), (span(k), True), ("\n", True)]
                k += 1
            else:
                tag = "think" if kind == "think" else "answer"
                pieces.append((f"<{tag}>{value}</{tag}>", True))
        pieces += [([t["<|im_end|>"]], True), (self._newline, False)]
        merged_pieces = []  # adjacent texts are tokenised together, as in the rendered chat text
        for p, s in pieces:
            if isinstance(p, str) and merged_pieces and isinstance(merged_pieces[-1][0], str) \
                    and merged_pieces[-1][1] == s:
                merged_pieces[-1] = (merged_pieces[-1][0] + p, s)
            else:
                merged_pieces.append((p, s))
        return chat.tokenize(self.tokenizer, merged_pieces)

    def _check_length(self, f: _File, row: int, n_tokens: int, detail: str = "") -> None:
        if self.seq_length is not None and n_tokens > self.seq_length:
            raise DataError(f.path, row, TRACE, f"sample has {n_tokens} tokens > seq_length "
                            f"{self.seq_length}{detail}", "too_long")

    def _plan(self, f: _File, row: int, parsed: Parsed, problem_sizes, reasoning_sizes) -> None:
        """Raise DataError when the row (its images of these (w, h) sizes) cannot be used."""
        raise NotImplementedError

    # ---- up-front scan ----------------------------------------------------------------------
    def _scan(self, errors: list, workers: int, raise_first: bool) -> np.ndarray:
        """Decode every referenced image (threads; PIL decodes without the GIL) and plan every
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
                            n = len(parsed.problem)
                            self._plan(f, row, parsed, got[:n], got[n:])
                            keep.append(int(self._file_start[fi]) + row)
                        except DataError as e:
                            if raise_first:
                                raise
                            errors.append(e)
        return np.asarray(keep, dtype=np.int64)
