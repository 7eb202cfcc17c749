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


def tally_skips(errors: list, kept: int, data_path, what: str, skipped: dict,
                examples: dict, logger) -> None:
    """Count skipped inputs by reason into `skipped` (and the first message of each into
    `examples`), log them once; all of them bad is an error."""
    for e in errors:
        skipped[e.reason] = skipped.get(e.reason, 0) + 1
        examples.setdefault(e.reason, str(e))
    if errors and not kept:
        raise ValueError(f"{data_path}: all {len(errors)} {what} are bad: {skipped}; "
                         f"first of each: {list(examples.values())}")
    if errors:
        logger.warning("%s: skipped %d of %d %s by reason %s; first of each: %s", data_path,
                       len(errors), len(errors) + kept, what, skipped, list(examples.values()))
