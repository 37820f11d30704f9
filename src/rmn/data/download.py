"""Fetch a release archive, check its MD5, unpack it safely, and only then move it into place.

Everything happens in a temporary folder next to the destination, so a failed or interrupted
download (network error, MD5 mismatch, hostile archive) leaves nothing behind that a later run could
mistake for a complete dataset; the final step is a single ``os.replace``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from .base import DataError, one_line

_CHUNK = 1 << 20


def download_release(url: str, md5: str, root: Path, dirname: str, timeout: float = 60.0) -> Path:
    """Make ``root/dirname`` from the ``.tar.gz`` at ``url`` (whose MD5 must be ``md5``); return it."""
    target = root / dirname
    if target.exists():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{root}: cannot create the download folder ({exc.strerror or exc})") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{dirname}.download-", dir=root))
    try:
        archive = tmp / "archive.tar.gz"
        got = _fetch(url, archive, timeout)
        if got != md5.lower():
            raise DataError(f"{url}: MD5 mismatch (got {got}, expected {md5}); the download was discarded")
        unpacked = tmp / "unpacked"
        unpacked.mkdir()
        _safe_extract(archive, unpacked, url)
        if not (unpacked / dirname).is_dir():
            raise DataError(f"{url}: archive does not contain the folder {dirname}/")
        try:
            os.replace(unpacked / dirname, target)
        except OSError as exc:
            if not target.is_dir():  # another process (e.g. a second rank) may have finished first
                raise DataError(f"{target}: cannot move the unpacked release into place ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fetch(url: str, dest: Path, timeout: float) -> str:
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", exc)
        raise DataError(f"{url}: download failed ({one_line(reason)})") from None
    return digest.hexdigest()


def _safe_extract(archive: Path, dest: Path, url: str) -> None:
    """Extract only plain files and folders whose paths stay inside ``dest``."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                parts = PurePosixPath(m.name).parts
                if m.name.startswith(("/", "\\")) or ".." in parts or not parts:
                    raise DataError(f"{url}: archive member {m.name!r} points outside the target folder")
                if not (m.isfile() or m.isdir()):
                    raise DataError(f"{url}: archive member {m.name!r} is a link or device, not a plain file")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python without PEP 706; the checks above already hold
                tar.extractall(dest, members=members)
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{url}: archive cannot be unpacked ({type(exc).__name__}: {one_line(exc)})") from None
