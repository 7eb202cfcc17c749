"""Opening images safely: only regular files inside the data's image folder, every PIL mode
turned into the RGB the model was trained on, or refused by name.

Records name their images relative to the image folder; a path that leaves it (absolute
elsewhere, or climbing out with `..`) is refused unless the user allows it
(`--allow-images-outside-folder`), so a records file cannot make the loader read any file.
A FIFO, device or directory is never opened (opening a FIFO blocks for ever). Symlinks inside
the folder are followed: whoever controls the folder chose them.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

import numpy as np
from PIL import Image

RGB_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")  # composited on white, like qwen_vl_utils
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and what is wrong."""


def leaves_folder(rel: str, folder) -> bool:
    """Whether a record's image path, relative or absolute, points outside `folder`; lexical
    (`..` resolved, no I/O), so a records file can be checked before any image is read."""
    folder = os.path.normpath(os.path.abspath(folder))
    full = os.path.normpath(os.path.join(folder, rel))
    return os.path.commonpath([folder, full]) != folder


def open_regular(path) -> BinaryIO:
    """A binary file object for `path`, refusing anything but a regular file. The file is
    opened non-blocking first, so a FIFO cannot hang the caller, then checked with fstat."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise ImageError(f"cannot open {path}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
            "a device or socket"
        raise ImageError(f"{path} is {kind}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _sixteen_bit(im: Image.Image) -> bool:
    return im.mode in SIXTEEN_BIT or (im.mode == "I" and im.format == "PNG")  # PNG I: 16-bit gray


def to_rgb(im: Image.Image, name) -> Image.Image:
    """`im` as 8-bit RGB. 16-bit grayscale is scaled (a plain PIL convert clips it to white);
    alpha is composited on white; modes whose value range is unknown are refused."""
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        mode, im = "RGBA", im.convert("RGBA")
    if mode in RGB_MODES:
        return im if mode == "RGB" else im.convert("RGB")
    if mode in ALPHA_MODES:
        rgba = im.convert("RGBA") if mode != "La" else im.convert("LA").convert("RGBA")
        out = Image.new("RGB", im.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if _sixteen_bit(im):
        a = np.asarray(im).astype(np.int64)
        if a.min() < 0 or a.max() > 65535:
            raise ImageError(f"{name}: mode {mode} holds values outside 0..65535")
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    raise ImageError(f"{name}: unsupported pixel mode {mode!r} (e.g. 32-bit integer or float "
                     "pixels, whose value range is unknown); convert it to 8-bit RGB first")


def open_image(path, *, decode: bool = True) -> Image.Image:
    """The image at `path` as 8-bit RGB (ImageError naming the file otherwise). With
    `decode=False` only the header is read and the mode checked: the caller gets the
    un-converted, unloaded image (its size and mode), e.g. for an up-front scan."""
    with open_regular(path) as f:
        try:
            im = Image.open(f)
            if not decode:
                if im.mode not in RGB_MODES + ALPHA_MODES and not _sixteen_bit(im):
                    to_rgb(im, path)  # raises, naming the mode
                return im
            im.load()
        except ImageError:
            raise
        except Exception as e:  # unidentified, truncated, decompression bomb, ...
            raise ImageError(f"cannot read {path}: {type(e).__name__}: {e}") from None
        return to_rgb(im, path)
