"""CIFAR readers on fixtures written byte-for-byte like the official python releases, plus download."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from rmn.data import DataError, build_dataset


# --- fixtures in the real format -------------------------------------------------------------------

def py2_pickle(obj) -> bytes:
    """Serialise ``obj`` as Python 2's ``cPickle.dump(obj, f, 2)`` with numpy 1.x did for the CIFAR release.

    Python 2 ``str`` become BINSTRING opcodes and arrays reference ``numpy.core.multiarray._reconstruct``,
    which Python 3 + numpy 2 never write themselves, so the reader is tested on the bytes it will meet.
    """
    out = bytearray(b"\x80\x02")

    def string(v):
        b = v.encode("latin1") if isinstance(v, str) else v
        out.extend(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b)

    def integer(v):
        if 0 <= v < 256:
            out.extend(b"K" + bytes([v]))
        elif 0 <= v < 65536:
            out.extend(b"M" + struct.pack("<H", v))
        else:
            out.extend(b"J" + struct.pack("<i", v))

    def tup(items):
        for v in items:
            emit(v)
        out.extend({1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(items)])

    def emit(v):
        if isinstance(v, dict):
            out.extend(b"}(")
            for k, val in v.items():
                emit(k)
                emit(val)
            out.extend(b"u")
        elif isinstance(v, list):
            out.extend(b"](")
            for x in v:
                emit(x)
            out.extend(b"e")
        elif isinstance(v, (str, bytes)):
            string(v)
        elif isinstance(v, int):
            integer(v)
        elif isinstance(v, np.ndarray):
            assert v.dtype == np.uint8
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            tup([0])
            string("b")
            out.extend(b"\x87R(")
            integer(1)
            tup(list(v.shape))
            out.extend(b"cnumpy\ndtype\n")
            string("u1")
            integer(0)
            integer(1)
            out.extend(b"\x87R(")
            integer(3)
            string("|")
            out.extend(b"NNN" + b"J" + struct.pack("<i", -1) + b"J" + struct.pack("<i", -1))
            integer(0)
            out.extend(b"tb\x89")  # dtype state built; fortran_order=False
            string(v.tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(v))

    emit(obj)
    out.extend(b".")
    return bytes(out)


def make_batch(rng, n, num_classes, labels_key):
    return {"batch_label": "training batch 1 of 1", labels_key: [int(v) for v in rng.integers(0, num_classes, n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img_{i}.png" for i in range(n)]}


def write_cifar100(root: Path, n_train=12, n_test=7, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    fine = [f"class_{i:03d}" for i in range(100)]
    (d / "meta").write_bytes(py2_pickle({"fine_label_names": fine, "coarse_label_names": [f"s{i}" for i in range(20)]}))
    for split, n in (("train", n_train), ("test", n_test)):
        batch = make_batch(rng, n, 100, "fine_labels")
        batch["coarse_labels"] = [v // 5 for v in batch["fine_labels"]]
        (d / split).write_bytes(py2_pickle(batch))
    return d


def write_cifar10(root: Path, n_per=5, seed=1) -> Path:
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (d / "batches.meta").write_bytes(py2_pickle({"num_cases_per_batch": n_per, "label_names": names, "num_vis": 3072}))
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / f).write_bytes(py2_pickle(make_batch(rng, n_per, 10, "labels")))
    return d


def read_raw(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")  # the fixture is trusted; this is the official recipe


def assert_one_line(exc: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


# --- reading -------------------------------------------------------------------------------------

def test_fixture_matches_the_official_recipe(tmp_path):
    d = write_cifar100(tmp_path)
    raw = read_raw(d / "train")
    assert set(raw) == {b"batch_label", b"fine_labels", b"coarse_labels", b"data", b"filenames"}
    assert raw[b"data"].dtype == np.uint8 and raw[b"data"].shape == (12, 3072)
    assert b"numpy.core.multiarray" in (d / "train").read_bytes()


def test_cifar100_shapes_labels_and_classes(tmp_path):
    d = write_cifar100(tmp_path)
    raw = read_raw(d / "train")
    for root in (tmp_path, d):  # the folder holding the release, or the release folder itself
        ds = build_dataset("cifar100", root=root, split="train")
        assert len(ds) == 12 and ds.num_classes == 100 and ds.classes[:2] == ["class_000", "class_001"]
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (12, 3, 32, 32)
        assert ds.targets.tolist() == raw[b"fine_labels"]
        # row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32x32
        assert torch.equal(ds.images[3, 1], torch.from_numpy(raw[b"data"][3, 1024:2048].reshape(32, 32)))
        x, y = ds[3]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
        assert y == raw[b"fine_labels"][3] and isinstance(y, int)
    test = build_dataset("cifar100", root=tmp_path, split="test")
    assert len(test) == 7 and len(build_dataset("cifar100", root=tmp_path, split="val")) == 7
    assert test.spec.mean == (0.5071, 0.4865, 0.4409) and test.spec.image_size == 32


def test_cifar10_concatenates_the_five_batches(tmp_path):
    d = write_cifar10(tmp_path)
    ds = build_dataset("cifar10", root=tmp_path)
    assert len(ds) == 25 and ds.classes[0] == "airplane" and ds.classes[-1] == "truck"
    expected = sum((read_raw(d / f"data_batch_{i}")[b"labels"] for i in range(1, 6)), [])
    assert ds.targets.tolist() == expected
    assert len(build_dataset("cifar10", root=tmp_path, split="test")) == 5


def test_python3_written_pickles_also_load(tmp_path):
    d = write_cifar100(tmp_path)
    original = read_raw(d / "train")
    for key_type in (str, lambda s: s.encode()):
        raw = {key_type(k.decode()): v for k, v in original.items()}
        (d / "train").write_bytes(pickle.dumps(raw, protocol=4))
        assert len(build_dataset("cifar100", root=tmp_path)) == 12


# --- hostile and broken files --------------------------------------------------------------------

class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.target}",)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    d = write_cifar100(tmp_path)
    marker = tmp_path / "pwned"
    (d / "train").write_bytes(pickle.dumps({"data": _Evil(marker), "fine_labels": []}, protocol=2))
    with pytest.raises(DataError) as exc:
        build_dataset("cifar100", root=tmp_path)
    assert_one_line(exc, str(d / "train"), "system", "refusing")
    assert not marker.exists()


@pytest.mark.parametrize("content, needle", [
    (["not", "a", "dict"], "expected a pickled dict"),
    ({"fine_labels": [1]}, "key 'data'"),
    ({"data": np.zeros((2, 3072), np.float32), "fine_labels": [0, 1]}, "uint8"),
    ({"data": np.zeros((2, 100), np.uint8), "fine_labels": [0, 1]}, "[N, 3072]"),
    ({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0]}, "1 labels for 2 images"),
    ({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 100]}, "0..99"),
    ({"data": np.zeros((2, 3072), np.uint8), "fine_labels": ["a", "b"]}, "integer labels"),
])
def test_pickle_with_unexpected_content(tmp_path, content, needle):
    d = write_cifar100(tmp_path)
    (d / "train").write_bytes(pickle.dumps(content, protocol=4))
    with pytest.raises(DataError) as exc:
        build_dataset("cifar100", root=tmp_path)
    assert_one_line(exc, str(d / "train"), needle)


def test_truncated_pickle(tmp_path):
    d = write_cifar100(tmp_path)
    (d / "test").write_bytes((d / "test").read_bytes()[:500])
    with pytest.raises(DataError) as exc:
        build_dataset("cifar100", root=tmp_path, split="test")
    assert_one_line(exc, str(d / "test"), "not a readable pickle")


def test_missing_root_release_and_split(tmp_path):
    with pytest.raises(DataError) as exc:
        build_dataset("cifar100", root=tmp_path / "nope")
    assert_one_line(exc, str(tmp_path / "nope"), "does not exist")
    with pytest.raises(DataError) as exc:
        build_dataset("cifar10", root=tmp_path)
    assert_one_line(exc, "cifar-10-batches-py")
    d = write_cifar100(tmp_path)
    (d / "test").unlink()
    with pytest.raises(DataError) as exc:
        build_dataset("cifar100", root=tmp_path, split="test")
    assert_one_line(exc, str(d / "test"), "missing")
    with pytest.raises(DataError) as exc:
        build_dataset("cifar100", root=tmp_path, split="extra")
    assert_one_line(exc, "'extra'")


# --- download ------------------------------------------------------------------------------------

def _tar_gz(members: dict[str, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def served(tmp_path):
    """A directory served over HTTP on 127.0.0.1 for the duration of one test."""
    public = tmp_path / "public"
    public.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(public)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield public, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _release_archive(tmp_path) -> bytes:
    src = write_cifar100(tmp_path / "src")
    members = {"cifar-100-python": None}
    members.update({f"cifar-100-python/{f}": (src / f).read_bytes() for f in ("train", "test", "meta")})
    return _tar_gz(members)


def test_download_verifies_md5_and_unpacks(tmp_path, served):
    public, base = served
    archive = _release_archive(tmp_path)
    (public / "cifar-100-python.tar.gz").write_bytes(archive)
    md5 = hashlib.md5(archive).hexdigest()
    dest = tmp_path / "data"
    ds = build_dataset("cifar100", root=dest, download=True, url=f"{base}/cifar-100-python.tar.gz", md5=md5)
    assert len(ds) == 12
    assert sorted(p.name for p in dest.iterdir()) == ["cifar-100-python"]  # no archive or temp folder left
    # a second call finds the release and does not download again (the server no longer has it)
    (public / "cifar-100-python.tar.gz").unlink()
    assert len(build_dataset("cifar100", root=dest, download=True, url=f"{base}/cifar-100-python.tar.gz")) == 12


def test_download_md5_mismatch_leaves_nothing(tmp_path, served):
    public, base = served
    (public / "cifar-100-python.tar.gz").write_bytes(_release_archive(tmp_path))
    dest = tmp_path / "data"
    url = f"{base}/cifar-100-python.tar.gz"
    with pytest.raises(DataError) as exc:  # the official MD5 cannot match the test archive
        build_dataset("cifar100", root=dest, download=True, url=url)
    assert_one_line(exc, url, "MD5 mismatch", "eb9058c3a382ffc7106e4002c42a8d85")
    assert list(dest.iterdir()) == []


def test_download_refuses_unsafe_archives_and_missing_files(tmp_path, served):
    public, base = served
    dest = tmp_path / "data"
    cases = {
        "traversal.tar.gz": (_tar_gz({"cifar-100-python/../../escaped": b"x"}), "outside the target"),
        "absolute.tar.gz": (_tar_gz({"/tmp/escaped": b"x"}), "outside the target"),
        "wrong.tar.gz": (_tar_gz({"something-else/train": b"x"}), "does not contain the folder cifar-100-python"),
        "garbage.tar.gz": (b"not a tar archive at all", "cannot be unpacked"),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        link = tarfile.TarInfo("cifar-100-python/train")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    cases["link.tar.gz"] = (buf.getvalue(), "link or device")
    for name, (data, needle) in cases.items():
        (public / name).write_bytes(data)
        with pytest.raises(DataError) as exc:
            build_dataset("cifar100", root=dest, download=True, url=f"{base}/{name}", md5=hashlib.md5(data).hexdigest())
        assert_one_line(exc, name, needle)
        assert list(dest.iterdir()) == []
    assert not (tmp_path / "escaped").exists()
    with pytest.raises(DataError) as exc:
        build_dataset("cifar100", root=dest, download=True, url=f"{base}/absent.tar.gz")
    assert_one_line(exc, "absent.tar.gz", "download failed", "404")
    assert list(dest.iterdir()) == []
