"""File integrity: checksums written beside what stellarlm saves, gzip streams checked whole.

Why: a damaged file must be an error naming the file, never a silently different answer. A
bit-flipped weights file still parses as safetensors, and a ``.gz`` file with a damaged block can
decompress to plausible numbers if the reader stops before the end of the stream, where gzip keeps
its CRC-32.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from pathlib import Path

from .errors import DataFileError

CHECKSUM_FILE = "checksums.json"
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks (a checkpoint may be larger than memory allows twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(directory: str | os.PathLike, names: list[str]) -> None:
    """``checksums.json`` in ``directory``: the SHA-256 of each of ``names`` (written atomically)."""
    directory = Path(directory)
    doc = {"format": "stellarlm-checksums", "algorithm": "sha256",
           "files": {n: sha256_file(directory / n) for n in names}}
    atomic_write(directory / CHECKSUM_FILE, lambda p: p.write_text(json.dumps(doc, indent=1)))


def verify_checksums(directory: str | os.PathLike, required: bool = False) -> None:
    """Check every file listed in ``directory``'s ``checksums.json``; raise DataFileError naming the
    first file that is missing or differs. Without the file: an error if ``required``, else nothing
    (a model directory written before checksums existed)."""
    directory = Path(directory)
    path = directory / CHECKSUM_FILE
    if not path.exists():
        if required:
            raise DataFileError(path, "checksum file missing (incomplete checkpoint)")
        return
    try:
        files = json.loads(path.read_text())["files"]
        items = [(str(k), str(v)) for k, v in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise DataFileError(path, f"unreadable checksum file ({type(exc).__name__}: {exc})") from exc
    for name, digest in items:
        f = directory / name
        if not f.exists():
            raise DataFileError(f, "file listed in checksums.json is missing")
        if sha256_file(f) != digest:
            raise DataFileError(f, "checksum mismatch: the file is damaged or was changed after it was written")


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, flushed to disk, then renamed over it:
    readers see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    """Flush a written file to the disk, so that a rename after it never points at lost data."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform that cannot open files read-only for fsync
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems do not support fsync
        pass
    finally:
        os.close(fd)


def is_gzip(path: str | os.PathLike) -> bool:
    """Whether the file starts with the gzip magic bytes (whatever its name says)."""
    try:
        with open(path, "rb") as f:
            return f.read(2) == _GZIP_MAGIC
    except OSError:
        return False


def check_gzip(path: str | os.PathLike) -> None:
    """For a gzip file, decompress the whole stream so that gzip checks its CRC-32 and length;
    raise DataFileError naming the file if it is damaged or truncated. Other files: nothing."""
    if not is_gzip(path):
        return
    try:
        with gzip.open(path, "rb") as f:
            while f.read(_CHUNK):
                pass
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataFileError(path, f"damaged gzip file ({type(exc).__name__}: {exc})") from exc
