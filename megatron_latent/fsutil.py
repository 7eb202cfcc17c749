"""Directories that appear only when complete: build in a temp dir beside the target, then
rename (same filesystem). A crash leaves the previous content, never a half-written one."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def check_writable(out: Path, overwrite: bool) -> None:
    """Refuse to replace a file, or a non-empty directory unless `overwrite`."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")


def check_output(out: str | Path, inputs, overwrite: bool, foreign: Callable[[Path], list[str]],
                 what: str) -> None:
    """A tool's output directory must never be, contain or sit inside one of its `inputs`
    (replacing it would delete them), and `overwrite` replaces only a previous output of the
    tool: `foreign(out)` lists what in `out` the tool would not have written (empty: its own)."""
    out = Path(out).resolve()
    for inp in inputs:
        inp = Path(inp).resolve()
        if out == inp or out.is_relative_to(inp) or inp.is_relative_to(out):
            rel = "is" if out == inp else "is inside" if out.is_relative_to(inp) else "contains"
            raise ValueError(f"--out {out} {rel} the input {inp}: writing there would delete "
                             "the input; choose another output directory")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out}: output directory already exists (pass --overwrite to "
                              f"replace a previous {what})")
    if bad := foreign(out):
        raise FileExistsError(f"{out}: --overwrite replaces only a previous {what}, and this "
                              f"directory holds what the tool does not write: {bad[:5]}; "
                              "remove it yourself or choose another output directory")


def new_temp_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`, replacing whatever `out` held."""
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700
    if out.exists() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old)  # rename() cannot replace a non-empty dir: move it aside
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)  # atomic; also replaces an empty directory


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """`with atomic_dir(out) as tmp:` write into tmp; on success it becomes `out`."""
    out = Path(out)
    tmp = new_temp_dir(out)
    try:
        yield tmp
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to a temp file beside `path`, fsync, rename over it: a crash never leaves a
    half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
