"""Unpickling that cannot run code: only plain builtins and numpy's ndarray reconstruction.

The CIFAR python releases are pickles written by Python 2 with numpy 1.x; a plain ``pickle.load``
would execute whatever callable a tampered file names. Here every global a pickle asks for must be on
an allow-list of exactly what the real release uses (``numpy.core.multiarray._reconstruct``,
``numpy.ndarray``, ``numpy.dtype``); dicts, lists, strings, bytes and numbers need no globals at all.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from .base import DataError, one_line

# numpy's own ndarray reconstructor, taken from ndarray.__reduce__ so no deprecated module is imported.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1, dtype=np.uint8))[0]

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 1.x (the real release)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # the same function under numpy 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path) -> None:
        # latin1: Python 2 ``str`` (CIFAR's keys and numpy's raw buffers) arrive as text losslessly.
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(f"{self._path}: pickle references {module}.{name}, which the dataset release never "
                            "contains; refusing to load it (the file may be tampered with)") from None

    def persistent_load(self, pid):
        raise DataError(f"{self._path}: pickle uses persistent ids, which the dataset release never contains")


def load_pickle(path: Path) -> object:
    """Load ``path`` with the restricted unpickler; any failure is a one-line :class:`DataError`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return _RestrictedUnpickler(io.BytesIO(data), path).load()
    except DataError:
        raise
    except Exception as exc:  # truncated or garbage: UnpicklingError, EOFError, ValueError, ...
        raise DataError(f"{path}: not a readable pickle ({type(exc).__name__}: {one_line(exc) or 'truncated'})") from None


def text_keys(obj: object, path: Path) -> dict:
    """A pickled dict with its keys as ``str`` (Python 2 files decode them as bytes or str)."""
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
