"""LVR stage-1 records: read LLaVA-style JSON (or a meta JSON listing several files), check each
record's structure, and map a normalised box to the merged visual tokens it covers.

Record fields: `image` (path or list, relative to the image folder), `conversations` ({"from":
"human"|"gpt" (a leading "system" turn is allowed), "value": str}; `<image>` placeholders in human
turns, one per image in order; `<lvr>` placeholders in gpt turns) and `bboxes` (one per `<lvr>`, in
order: `[x0, y0, x1, y1]` normalised xyxy when the record has exactly one image, else
`{"image": i, "bbox": [x0, y0, x1, y1]}`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from megatron_latent.data.errors import DataError
from megatron_latent.data.images import leaves_folder

IMAGE_PLACEHOLDER, LVR_PLACEHOLDER = "<image>", "<lvr>"
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
# Literal token strings that would corrupt the layout if they reached the tokenizer from text.
RESERVED = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<|lvr_start|>", "<|lvr|>",
            "<|lvr_end|>")


# the data error of every loader (the LVR name is kept for existing callers)
LvrDataError = DataError


@dataclass(frozen=True)
class Record:
    file: str
    index: int  # position in its JSON file
    images: tuple[str, ...]  # resolved paths
    turns: tuple[tuple[str, str], ...]  # (role: system|user|assistant, text)
    boxes: tuple[tuple[int, tuple[float, float, float, float]], ...]  # (image index, xyxy)


def bbox_token_indices(bbox, grid_hw, merge_size: int = 2) -> list[int]:
    """Row-major indices of the merged visual tokens a normalised xyxy box covers, on an image
    whose patch grid is (h, w) (14-px patches; merged grid h/merge x w/merge). The seed's rule:
    a merged token is taken when any patch of the box's patch-aligned cover lies in it."""
    h, w = grid_hw
    x0, y0, x1, y1 = bbox
    gx0, gx1 = min(max(math.floor(x0 * w), 0), w - 1), min(max(math.ceil(x1 * w), 0), w)
    gy0, gy1 = min(max(math.floor(y0 * h), 0), h - 1), min(max(math.ceil(y1 * h), 0), h)
    m = merge_size
    tx0, tx1, ty0, ty1 = gx0 // m, -(-gx1 // m), gy0 // m, -(-gy1 // m)
    w2 = w // m
    return [ty * w2 + tx for ty in range(ty0, ty1) for tx in range(tx0, tx1)]


def _parse_box(b, n_images: int, fail) -> tuple[int, tuple[float, ...]]:
    if isinstance(b, dict):
        k, xyxy = b.get("image"), b.get("bbox")
        if type(k) is not int or not 0 <= k < n_images:
            fail(f"'image' must be an image index in [0, {n_images}), got {k!r}")
    elif isinstance(b, list):
        if n_images != 1:
            fail(f"a plain [x0, y0, x1, y1] box needs exactly one image (record has {n_images}); "
                 'use {"image": i, "bbox": [x0, y0, x1, y1]}')
        k, xyxy = 0, b
    else:
        fail(f"must be [x0, y0, x1, y1] or {{\"image\": i, \"bbox\": [...]}}, got {b!r}")
    if (not isinstance(xyxy, list) or len(xyxy) != 4
            or not all(type(v) in (int, float) and math.isfinite(v) for v in xyxy)):
        fail(f"box must be 4 finite numbers, got {xyxy!r}")
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        fail(f"box {xyxy} is outside [0, 1] (normalised xyxy expected)")
    if x0 >= x1 or y0 >= y1:
        fail(f"box {xyxy} is empty: need x0 < x1 and y0 < y1")
    return k, (x0, y0, x1, y1)


def validate_record(raw, file, index: int, image_folder, *, allow_outside: bool = False) -> Record:
    """Structural checks (no I/O); raises LvrDataError naming file, record index and field.
    Image paths must stay inside `image_folder` unless `allow_outside` (data/images.py)."""
    def fail(field, msg, reason):
        raise LvrDataError(file, index, field, msg, reason)

    if not isinstance(raw, dict):
        fail(None, f"record must be a JSON object, got {type(raw).__name__}", "record")
    img = raw.get("image")
    images = [] if img is None else [img] if isinstance(img, str) else img
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        fail("image", f"must be a path or a list of paths, got {img!r}", "image")
    for k, p in enumerate(images):
        if not allow_outside and leaves_folder(p, image_folder):
            fail(f"image[{k}]", f"{p!r} leaves the image folder {image_folder} (absolute or "
                 "'..' path); name images relative to it, or pass "
                 "--allow-images-outside-folder", "image_path")
    conv = raw.get("conversations")
    if not isinstance(conv, list) or not conv:
        fail("conversations", "must be a non-empty list of {from, value} turns", "conversations")
    turns = []
    for j, turn in enumerate(conv):
        f = f"conversations[{j}]"
        if not isinstance(turn, dict) or turn.get("from") not in ROLES:
            fail(f + ".from", f"must be one of {sorted(ROLES)}, got {turn!r:.80}", "conversations")
        role, value = ROLES[turn["from"]], turn.get("value")
        if not isinstance(value, str):
            fail(f + ".value", f"must be a string, got {type(value).__name__}", "conversations")
        if role == "system" and j:
            fail(f + ".from", "a system turn may only come first", "conversations")
        if bad := [t for t in RESERVED if t in value]:
            fail(f + ".value", f"contains reserved token text {bad}", "reserved_token")
        if role != "user" and IMAGE_PLACEHOLDER in value:
            fail(f + ".value", "<image> is allowed only in human turns", "image_count")
        if role != "assistant" and LVR_PLACEHOLDER in value:
            fail(f + ".value", "<lvr> is allowed only in gpt turns", "lvr_count")
        turns.append((role, value))
    if not any(r == "assistant" for r, _ in turns):
        fail("conversations", "no gpt turn: nothing to supervise", "conversations")
    n_img = sum(v.count(IMAGE_PLACEHOLDER) for _, v in turns)
    if n_img != len(images):
        fail("image", f"{len(images)} image(s) but {n_img} <image> placeholder(s) in human turns",
             "image_count")
    raw_boxes = raw.get("bboxes")
    raw_boxes = [] if raw_boxes is None else raw_boxes
    if not isinstance(raw_boxes, list):
        fail("bboxes", f"must be a list, got {type(raw_boxes).__name__}", "bbox")
    n_lvr = sum(v.count(LVR_PLACEHOLDER) for _, v in turns)
    if n_lvr != len(raw_boxes):
        fail("bboxes", f"{n_lvr} <lvr> placeholder(s) in gpt turns but {len(raw_boxes)} box(es)",
             "lvr_count")
    boxes = []
    for k, b in enumerate(raw_boxes):
        boxes.append(_parse_box(b, len(images), lambda m, k=k: fail(f"bboxes[{k}]", m, "bbox")))
    paths = tuple(os.path.join(image_folder, p) for p in images)
    return Record(str(file), index, paths, tuple(turns), tuple(boxes))


class RecordStore:
    """Validated records packed into one bytes buffer plus offsets: DataLoader workers forked
    from the main process share it without copy-on-write of millions of small Python objects."""

    def __init__(self, records):
        self.files: list[str] = []
        file_ids, blobs = {}, []
        for r in records:
            fid = file_ids.setdefault(r.file, len(file_ids))
            if fid == len(self.files):
                self.files.append(r.file)
            blobs.append(json.dumps([fid, r.index, r.images, r.turns, r.boxes]).encode())
        self._buf = b"".join(blobs)
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> Record:
        start = int(self._ends[i - 1]) if i else 0
        fid, index, images, turns, boxes = json.loads(self._buf[start:int(self._ends[i])])
        return Record(self.files[fid], index, tuple(images), tuple(map(tuple, turns)),
                      tuple((k, tuple(xyxy)) for k, xyxy in boxes))


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LvrDataError(path, None, None, f"unreadable JSON: {e}", "json") from e


def _is_meta(obj) -> bool:
    """A meta JSON: {name: {"data_path", "image_folder"}} or a list of such entries. A JSON
    object without any such entry is not one (e.g. a single record not wrapped in a list)."""
    if isinstance(obj, dict):
        return any(isinstance(v, dict) and "data_path" in v for v in obj.values())
    return (isinstance(obj, list) and bool(obj) and isinstance(obj[0], dict)
            and "data_path" in obj[0])


def _not_a_list(obj) -> str:
    got = {dict: "object", str: "string", bool: "boolean", type(None): "null"}.get(type(obj),
                                                                                   "number")
    hint = (": it looks like a single record, wrap it in [ ]" if isinstance(obj, dict)
            and "conversations" in obj else ' (nor a meta JSON of {name: {"data_path": ...}})')
    return f"expected a JSON list of records, got a JSON {got}{hint}"


def _sources(path: Path, obj, image_folder):
    """Yield (records JSON path, image folder, parsed list), one file at a time; a meta file's
    relative paths are resolved against the meta file's directory."""
    if not _is_meta(obj):
        yield path, Path(image_folder).absolute() if image_folder is not None else path.parent, obj
        return
    entries = list(obj.values()) if isinstance(obj, dict) else obj
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("data_path"), str):
            raise LvrDataError(path, i, "data_path",
                               f"meta entry needs a 'data_path' string: {e!r:.100}", "meta")
    for e in entries:
        data = path.parent / e["data_path"]
        folder = path.parent / e["image_folder"] if e.get("image_folder") else data.parent
        sub = _read_json(data)
        if _is_meta(sub):
            raise LvrDataError(data, None, None, "a meta JSON may not list another meta JSON",
                               "meta")
        yield data, folder, sub


def load_records(data_path, image_folder=None,
                 on_error: Callable[[LvrDataError], None] | None = None, *,
                 allow_outside_folder: bool = False) -> RecordStore:
    """Parse `data_path` (records or meta JSON) and validate every record's structure.

    JSON errors always raise, and so does a data path without any record. A bad record raises,
    or, with `on_error`, is passed to it and left out. `image_folder` applies to a plain records
    file (default: that file's directory)."""
    path = Path(data_path).absolute()
    files, seen = [], 0

    def records():
        nonlocal seen
        for file, folder, obj in _sources(path, _read_json(path), image_folder):
            if not isinstance(obj, list):
                raise LvrDataError(file, None, None, _not_a_list(obj), "json")
            files.append(str(file))
            seen += len(obj)
            for i, raw in enumerate(obj):
                try:
                    yield validate_record(raw, file, i, folder,
                                          allow_outside=allow_outside_folder)
                except LvrDataError as e:
                    if on_error is None:
                        raise
                    on_error(e)

    store = RecordStore(records())
    if not len(store) and not seen:  # all-bad records are reported by the caller
        raise LvrDataError(path, None, None, f"no records in {files}: a records file must be a "
                           "non-empty JSON list (an empty dataset would fail mid-run)", "json")
    return store
