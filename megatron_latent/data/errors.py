"""The error every data loader raises for a bad input, naming file, record and field."""

from __future__ import annotations


class DataError(ValueError):
    """A bad input. The message names the file, the record index and the field; `reason` is a
    short category used to count skipped records."""

    def __init__(self, file, index, field, message: str, reason: str = "invalid"):
        self.file, self.index, self.field, self.reason = str(file), index, field, reason
        where = f"record {index}" if index is not None else "(whole file)"
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{file}: {where}: {what}{message}")
