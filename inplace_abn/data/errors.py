"""The error the data readers raise for a missing or malformed file: one line that names the file.
Free of numpy, so the command line can catch it without the data extras installed."""

from __future__ import annotations

from typing import Optional

#: what can be wrong with a file, as :attr:`DataError.kind` reports it (and ``check-data`` counts it)
KINDS = {
    "missing": "missing file: an image without its label, a label without its image, an absent map",
    "unreadable": "unreadable file: truncated, corrupt or not an image",
    "label ids": "label map with ids outside the dataset's range",
    "size": "label map of another size than its image",
    "format": "label map that is not one integer id per pixel",
    "layout": "folder missing from the dataset's layout",
}


class DataError(ValueError):
    """Missing or malformed data: the message names the file or folder and says what was expected.

    ``path`` is that file or folder, ``kind`` one of :data:`KINDS`.
    """

    def __init__(self, message: str, path: Optional[str] = None, kind: str = "layout"):
        super().__init__(message)
        if kind not in KINDS:
            raise ValueError(f"DataError kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.path, self.kind = path, kind

    def __reduce__(self):
        return type(self), (str(self), self.path, self.kind)


def message_of(error: BaseException) -> str:
    """The message ``error`` was raised with. A DataLoader worker's exception reaches the main process
    re-raised with the worker's whole traceback as its message; this returns the original line."""
    text = str(error)
    if not text.startswith(f"Caught {type(error).__name__} in DataLoader worker"):
        return text
    # the traceback ends with "<module>.<class>: <message>", as Python formats any exception
    marker = f"{type(error).__module__}.{type(error).__qualname__}: "
    before, found, message = text.rpartition(marker)
    return message.strip() if found else text
