"""RL prompts, in either of two formats (`load_rl_prompts` picks by path):

* LVR stage 2: LLaVA-style JSON without <image> tokens, the gpt turn holding the reference
  ("<answer>X</answer>"); a records file or a meta JSON listing them, as in SFT. Images are paths.
* verl/EasyR1 parquet (HyLaR-RL-Data; EasyR1's `verl/utils/dataset.py` reads it): a .parquet file
  or a directory of them (its own *.parquet, no sub-folders), rows of `problem` (one `<image>`
  placeholder per image, where that image goes in the user turn), `answer` and `images` (a list
  of {"bytes": ...} structs, raw bytes or base64 strings), or Thyme-RL's rows of `question`,
  `solution` and one base64 image (`image`, or `images` of one), read as
  problem = "<image>" + question. Only the text columns are read at load; a prompt's image
  bytes are read when the prompt is taken (`prompts[i]`, streamed from its row group) and
  decoded when it is built (`RLPrompt.open_images`), so a 50k-row set of large images costs its
  text in memory, not its pixels. Newlines touching a placeholder are dropped, as in SFT
  records (data/chat.py); EasyR1 keeps them as text (its HyLaR rows have none).

Bad records raise DataError naming the file, record and field: text problems at load, image
problems (count, base64, decoding) when the prompt is taken or built, or all at load with
`scan=True`."""

from __future__ import annotations

import base64
import bisect
import io
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megatron_latent.data.chat import IMAGE_PLACEHOLDER
from megatron_latent.data.errors import DataError
from megatron_latent.data.llava_records import RESERVED, _read_json, _sources


@dataclass(frozen=True)
class EncodedImage:
    """An image's encoded bytes (PNG, JPEG, ...) from a parquet row; decoded only when its
    prompt is built. `file`, `index` and `field` name it in errors."""
    data: bytes = field(repr=False)
    file: str
    index: int
    field: str

    def open(self):
        """The decoded image as 8-bit RGB, as training converts images (data/images.to_rgb)."""
        from PIL import Image

        from megatron_latent.data.images import to_rgb

        try:
            im = Image.open(io.BytesIO(self.data))
            im.load()
            return to_rgb(im, self.field)
        except Image.UnidentifiedImageError:
            raise DataError(self.file, self.index, self.field, "cannot decode the image: not an "
                            "image file PIL can identify (PNG, JPEG, ...)", "image") from None
        except Exception as e:  # truncated, odd pixel mode, decompression bomb, ...
            raise DataError(self.file, self.index, self.field,
                            f"cannot decode the image: {type(e).__name__}: {e}", "image") from None


@dataclass(frozen=True)
class RLPrompt:
    id: str
    images: tuple  # image paths, EncodedImage or PIL images
    question: str  # `<image>` placeholders, if any, place the images (else they come first)
    reference: str

    def open_images(self) -> list:
        """The images as RGB PIL images, in order; DataError naming the bad one."""
        from PIL import Image

        from megatron_latent.data.images import to_rgb
        from megatron_latent.inference.loading import open_image

        out = []
        for k, image in enumerate(self.images):
            if isinstance(image, EncodedImage):
                out.append(image.open())
                continue
            try:
                out.append(to_rgb(image, f"image[{k}]") if isinstance(image, Image.Image)
                           else open_image(image))
            except ValueError as e:
                raise DataError(image if isinstance(image, (str, Path)) else self.id, None,
                                f"image[{k}]", f"{self.id}: {e}") from e
        return out


def _record(raw, file, i: int, folder: Path) -> RLPrompt:
    def fail(field, msg):
        raise DataError(file, i, field, msg)

    if not isinstance(raw, dict):
        fail(None, f"expected an object, got {type(raw).__name__}")
    imgs = raw.get("image", raw.get("images"))
    imgs = [imgs] if isinstance(imgs, str) else imgs
    if not imgs or not all(isinstance(x, str) and x for x in imgs):
        fail("image", "needs an image path or a non-empty list of them")
    paths = []
    for k, name in enumerate(imgs):
        p = folder / name
        if not p.is_file():
            fail(f"image[{k}]" if len(imgs) > 1 else "image", f"file not found: {p}")
        paths.append(str(p))
    conv = raw.get("conversations")
    if (not isinstance(conv, list) or len(conv) < 2
            or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in conv)):
        fail("conversations", "needs a human turn and a gpt turn with string values")
    human, gpt = conv[0], conv[1]
    if human.get("from") != "human" or gpt.get("from") != "gpt":
        fail("conversations", "expected turns from 'human' then 'gpt'")
    if "<image>" in human["value"]:
        fail("conversations[0].value", "stage-2 prompts carry no <image> token (images come "
             "first in the user turn)")
    if not human["value"].strip() or not gpt["value"].strip():
        fail("conversations", "empty question or reference")
    for k, turn in enumerate((human, gpt)):  # they would break the chat template
        if bad := [t for t in RESERVED if t in turn["value"]]:
            fail(f"conversations[{k}].value", f"contains reserved special tokens {bad}")
    return RLPrompt(str(raw.get("id", f"{Path(file).name}#{i}")), tuple(paths),
                    human["value"].strip(), gpt["value"].strip())


def load_rl_prompts(data_path, image_folder=None, *, scan: bool = False) -> Sequence[RLPrompt]:
    """The prompts of `data_path`: a .parquet file or a directory of them (`ParquetPrompts`,
    read lazily; `scan` checks every row's images up front), else JSON records or a meta JSON
    (a list; `image_folder` as in SFT)."""
    path = Path(data_path).absolute()
    if path.is_dir() or path.suffix == ".parquet":
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise DataError(path, None, None, "a directory without *.parquet files", "parquet")
        prompts = ParquetPrompts(files)
        if scan:
            prompts.check_images()
        return prompts
    out = []
    for file, folder, obj in _sources(path, _read_json(path), image_folder):
        if not isinstance(obj, list):
            raise DataError(file, None, None, "expected a JSON list of records", "json")
        out += [_record(raw, file, i, Path(folder)) for i, raw in enumerate(obj)]
    if not out:
        raise DataError(path, None, None, "no records", "json")
    return out


# ---------------------------------------------------------------------- verl/EasyR1 parquet
# (text column, answer column, what precedes the text): the problem form, then Thyme-RL's
FORMS = (("problem", "answer", ""), ("question", "solution", IMAGE_PLACEHOLDER))
IMAGE_COLUMNS = ("images", "image")
STREAM_ROWS = 8  # image rows converted to Python at a time (see `_PromptFile.cells`)
_RAW_IMAGE = (b"\xff\xd8", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")
_DATA_URL = re.compile(r"^\s*data:[^;,]*;base64,", re.I)


def _base64(text: str) -> bytes:
    """Base64 (a data-URL header, line breaks and missing padding tolerated) -> bytes."""
    s = "".join(_DATA_URL.sub("", text).split())
    return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)


def _image_bytes(value, fail) -> bytes:
    """An images-cell item ({"bytes": ...}, bytes, or a base64 str/bytes) -> encoded bytes."""
    if isinstance(value, dict):
        if not value.get("bytes"):
            fail("an image struct without bytes (paths in parquet rows are not read)")
        value = value["bytes"]
    if isinstance(value, (bytes, bytearray)):
        if bytes(value[:8]).startswith(_RAW_IMAGE):
            return bytes(value)
        try:  # EasyR1 accepts base64 as bytes too
            return _base64(value.decode("ascii"))
        except ValueError:  # raw bytes of a format not sniffed above: decoding will tell
            return bytes(value)
    if isinstance(value, str):
        try:
            data = _base64(value)
        except ValueError as e:
            fail(f"a string that is not base64: {e}")
        if not data:
            fail("an empty image")
        return data
    fail(f"expected {{'bytes': ...}}, bytes or a base64 string, got {type(value).__name__}")


class _PromptFile:
    """One parquet file: its text columns checked and held; its image column read on demand."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path = path
        try:
            with pq.ParquetFile(path) as pf:
                meta, names = pf.metadata, pf.schema_arrow.names
        except Exception as e:
            raise DataError(path, None, None, f"unreadable parquet: {e}", "parquet") from None
        form = next((f for f in FORMS if f[0] in names), None)
        if form is None:
            raise DataError(path, None, "problem", "missing column: rows need 'problem', "
                            f"'answer', 'images' (or 'question', 'solution', 'image'); has {names}",
                            "column")
        text, answer, self.prefix = form
        if answer not in names:
            raise DataError(path, None, answer, f"missing column (next to {text!r}); has {names}",
                            "column")
        self.image_column = next((c for c in IMAGE_COLUMNS if c in names), None)
        table = pq.read_table(path, columns=[text, answer] + ["id"] * ("id" in names))
        self.texts, self.answers = (table.column(c).to_pylist() for c in (text, answer))
        self.ids = table.column("id").to_pylist() if "id" in names else [None] * len(self.texts)
        for i, (q, a) in enumerate(zip(self.texts, self.answers)):
            for name, value in ((text, q), (answer, a)):
                if not isinstance(value, str) or not value.strip():
                    got = "null" if value is None else repr(value)[:40]
                    raise DataError(path, i, name, f"needs a non-empty string, got {got}")
                if bad := [t for t in RESERVED if t in value]:  # they would break the template
                    raise DataError(path, i, name, f"contains reserved special tokens {bad}")
        self.group_starts = [0]
        for g in range(meta.num_row_groups):
            self.group_starts.append(self.group_starts[-1] + meta.row_group(g).num_rows)

    def __len__(self) -> int:
        return len(self.texts)

    def cells(self, start: int = 0):
        """(row, image cell) from row `start` on, read from the start of its row group. A
        buffered reader streams data pages, so memory holds one page, not the row group; but
        writers check the page size only every `write_batch_size` rows (1024 by default), so
        files of large images often have one page per row group: then the row group's images
        are read (and freed) per prompt, which is what taking a prompt costs."""
        if self.image_column is None:
            yield from ((r, None) for r in range(start, len(self)))
            return
        import pyarrow.parquet as pq

        g = bisect.bisect_right(self.group_starts, start) - 1
        row = self.group_starts[g]
        with pq.ParquetFile(self.path, buffer_size=1 << 20) as pf:
            for batch in pf.iter_batches(batch_size=STREAM_ROWS, columns=[self.image_column],
                                         row_groups=range(g, len(self.group_starts) - 1)):
                column = batch.column(0)
                for j in range(max(0, start - row), len(column)):
                    yield row + j, column[j].as_py()
                row += len(column)

    def prompt(self, row: int, cell) -> RLPrompt:
        column = self.image_column or IMAGE_COLUMNS[0]
        items = [] if cell is None else cell if isinstance(cell, list) else [cell]
        images = []
        for k, value in enumerate(items):
            name = f"{column}[{k}]"

            def fail(msg, name=name):
                raise DataError(self.path, row, name, msg, "image")

            images.append(EncodedImage(_image_bytes(value, fail), str(self.path), row, name))
        question = (self.prefix + self.texts[row]).strip()
        if (n := question.count(IMAGE_PLACEHOLDER)) != len(images):
            raise DataError(self.path, row, column, f"{len(images)} images for {n} "
                            f"{IMAGE_PLACEHOLDER} placeholders in the question (one per image)",
                            "image_count")
        rid = self.ids[row]
        return RLPrompt(f"{self.path.name}#{row}" if rid is None else str(rid), tuple(images),
                        question, self.answers[row].strip())


class ParquetPrompts(Sequence):
    """RL prompts from parquet files, indexed across them in order; `prompts[i]` reads prompt i's
    image bytes (see the module docstring)."""

    def __init__(self, files):
        self.files = [_PromptFile(Path(f)) for f in files]
        self.starts = [0]
        for f in self.files:
            self.starts.append(self.starts[-1] + len(f))
        if not len(self):
            raise DataError(self.files[0].path if self.files else None, None, None, "no rows",
                            "parquet")

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> RLPrompt:
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"prompt {i} of {len(self)}")
        i %= len(self)
        k = bisect.bisect_right(self.starts, i) - 1
        f, row = self.files[k], i - self.starts[k]
        cells = f.cells(row)
        try:
            return f.prompt(*next(cells))
        finally:
            cells.close()  # closes the file now, not when collected

    def __iter__(self):
        for f in self.files:  # one sequential stream per file
            for row, cell in f.cells():
                yield f.prompt(row, cell)

    def check_images(self) -> None:
        """Read and decode every image once (bounded memory); DataError at the first bad one."""
        for prompt in self:
            prompt.open_images()
