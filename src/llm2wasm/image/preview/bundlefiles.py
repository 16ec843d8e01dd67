"""The bundle as hostile input: a request path normalised to segments, and the regular file at them
opened without following a symlink anywhere on the way (nothing hidden, nothing outside).

Every byte the preview server hands out of a bundle, and every file of it the app-config check reads,
goes through here, so what may be served is decided in one place; a refusal is Refused, with the
status to answer and the reason for the log.
"""

from __future__ import annotations

import os
import stat
from http import HTTPStatus
from pathlib import Path
from urllib.parse import unquote


class Refused(Exception):
    """A request (or a file the app config names) that is not served; `reason` is for the log."""

    def __init__(self, status: HTTPStatus, what: str, reason: str | None = None):
        super().__init__(what)
        self.status, self.what, self.reason = status, what, reason


def path_segments(raw: str) -> list[str]:
    """The request path (or a path the app config names, with a leading /) as segments: decoded
    once, `\\` taken for `/`, empty and `.` segments dropped, `..` applied. Raises Refused: 400
    for what is not a path, 404 for one that leaves the root or has a hidden segment. Everything
    after this sees only the segments, so no spelling of a path reaches a file another does not."""
    if not raw.startswith("/"):
        raise Refused(HTTPStatus.BAD_REQUEST, "not a path", f"request target {raw[:80]!r} is not a path")
    try:
        decoded = unquote(raw.split("?", 1)[0].split("#", 1)[0], errors="strict")
    except UnicodeDecodeError:
        raise Refused(HTTPStatus.BAD_REQUEST, "not UTF-8", "the path is not UTF-8 once decoded") from None
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in decoded):
        raise Refused(HTTPStatus.BAD_REQUEST, "control characters", "the path holds control characters")
    segments: list[str] = []
    for segment in decoded.replace("\\", "/").split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise Refused(HTTPStatus.NOT_FOUND, "outside the bundle", "the path leaves the bundle")
            segments.pop()
        else:
            segments.append(segment)
    if any(segment.startswith(".") for segment in segments):
        raise Refused(HTTPStatus.NOT_FOUND, "a hidden file", "the path has a hidden segment (.llm2wasm and the like)")
    return segments


def open_regular(root: Path, segments: list[str]) -> tuple[int, os.stat_result]:
    """An open descriptor of the regular file at `segments` under `root`, and its stat. Each
    segment is looked up in the folder opened before it, and none is followed if it is a symlink
    (lstat, then O_NOFOLLOW, then fstat of what was opened): a symlink anywhere on the way, a
    folder, a device or a pipe is refused (Refused, 404), whatever it points at."""
    if not segments:
        raise Refused(HTTPStatus.NOT_FOUND, "a folder: no listings", "folders are not listed")
    shown = "/".join(segments)
    try:
        folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise Refused(HTTPStatus.NOT_FOUND, f"{root} is not there", f"{root}: {error.strerror}") from None
    try:
        for index, name in enumerate(segments):
            last = index == len(segments) - 1
            try:
                info = os.lstat(name, dir_fd=folder)
            except FileNotFoundError:
                raise Refused(HTTPStatus.NOT_FOUND, f"not in the bundle {root}") from None
            except OSError as error:
                raise Refused(HTTPStatus.NOT_FOUND, "not readable", f"{shown}: {error.strerror}") from None
            if stat.S_ISLNK(info.st_mode):
                target = "/".join([*segments[:index], name])
                try:
                    points_at = os.readlink(name, dir_fd=folder)
                except OSError:
                    points_at = "?"
                raise Refused(
                    HTTPStatus.NOT_FOUND,
                    "a symlink in the bundle: not followed",
                    f"{target} is a symlink (to {points_at!r}): only regular files are served",
                )
            if not last:
                if not stat.S_ISDIR(info.st_mode):
                    raise Refused(HTTPStatus.NOT_FOUND, f"not in the bundle {root}")
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            elif stat.S_ISDIR(info.st_mode):
                raise Refused(HTTPStatus.NOT_FOUND, "a folder: no listings", f"{shown} is a folder: not listed")
            elif not stat.S_ISREG(info.st_mode):
                raise Refused(HTTPStatus.NOT_FOUND, "not a regular file", f"{shown} is not a regular file")
            else:
                # O_NONBLOCK: a FIFO swapped in after the lstat must not hang the server
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            try:
                opened = os.open(name, flags, dir_fd=folder)
            except OSError as error:
                # ELOOP/ENOTDIR: it became a symlink after the lstat
                raise Refused(HTTPStatus.NOT_FOUND, "not readable", f"{shown}: {error.strerror}") from None
            now = os.fstat(opened)
            if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino) or (last and not stat.S_ISREG(now.st_mode)):
                os.close(opened)
                raise Refused(HTTPStatus.NOT_FOUND, "changed while opened", f"{shown} changed while it was opened")
            os.close(folder)
            folder = opened
        result, folder = folder, -1
        return result, now
    finally:
        if folder >= 0:
            os.close(folder)


def read_regular(root: Path, relative: str) -> bytes:
    """The bytes of a regular file of the bundle, found as a request for it would be."""
    fd, _ = open_regular(root, path_segments("/" + relative))
    with os.fdopen(fd, "rb") as file:
        return file.read()


def is_regular(root: Path, relative: str) -> bool:
    try:
        os.close(open_regular(root, path_segments("/" + relative))[0])
    except Refused:
        return False
    return True
