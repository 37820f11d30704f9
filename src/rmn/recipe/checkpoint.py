"""Crash-safe checkpoints: one safetensors file per checkpoint, plus a JSON side-car for people.

The safetensors file holds the model weights, the optimizer's tensors and the RNG states; its
header metadata holds everything else as JSON (config, phase, epoch, step, optimizer param groups).
Loading never unpickles anything. Files are written to a temporary name, flushed and renamed, so
a kill at any moment leaves either the previous checkpoint or the new one, never half of one.

A damaged file (cut short by a file system that lost its tail, or replaced by something else) is
never trusted and never preferred: finding the newest checkpoint skips it and says why, and pruning
counts only readable checkpoints, so it never deletes a readable one to keep a damaged one.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

FORMAT = "rmn-checkpoint-1"
NAME = re.compile(r"^ckpt-(\d{5})-([a-z]+)-e(\d+)\.safetensors$")


REQUIRED_META = ("format", "seq", "phase", "epoch", "step", "config")
PHASES = ("stem", "cloned", "memory", "routed", "baseline")
UNREADABLE_DIR = "unreadable"  # where resume moves damaged files aside (never deleted)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file, ``reason`` says why in a few words."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


def _bad(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path}: {reason}", reason)


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    rng: dict[str, Any] = field(default_factory=dict)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (POSIX-atomic)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def restore_rng(ckpt: Checkpoint) -> None:
    """Put the global RNGs back where they were when the checkpoint was written."""
    if "torch" in ckpt.rng:
        torch.set_rng_state(ckpt.rng["torch"])
    cuda = [ckpt.rng[k] for k in sorted(k for k in ckpt.rng if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    py = ckpt.meta.get("rng", {}).get("python")
    if py:
        random.setstate((py[0], tuple(py[1]), py[2]))
    npst = ckpt.meta.get("rng", {}).get("numpy")
    if npst:
        np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]))


def _optimizer_split(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors and a JSON-able rest."""
    tensors, state_meta = {}, {}
    for pid, st in opt_state["state"].items():
        entry = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
                entry[k] = {"tensor": True}
            else:
                entry[k] = v
        state_meta[str(pid)] = entry
    return tensors, {"state": state_meta, "param_groups": opt_state["param_groups"]}


def _optimizer_join(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {
            k: (tensors[f"optim.{pid}.{k}"] if isinstance(v, dict) and v.get("tensor") else v) for k, v in entry.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: Path,
    seq: int,
    phase: str,
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    meta: dict[str, Any],
    keep: int = 2,
    keep_best: bool = False,
) -> Path:
    """Write checkpoint number ``seq`` and prune all but the newest ``keep`` readable ones (and the best)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    full_meta = dict(meta, format=FORMAT, seq=seq, phase=phase, epoch=epoch)
    if optimizer is not None:
        opt_tensors, opt_meta = _optimizer_split(optimizer.state_dict())
        tensors.update({k: v.detach().cpu().contiguous().clone() for k, v in opt_tensors.items()})
        full_meta["optimizer"] = opt_meta
    rng_tensors, rng_meta = _rng_state()
    tensors.update(rng_tensors)
    full_meta["rng"] = rng_meta
    path = directory / f"ckpt-{seq:05d}-{phase}-e{epoch}.safetensors"
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={"rmn": json.dumps(full_meta)}))
    side = {k: v for k, v in full_meta.items() if k not in ("rng", "optimizer")}
    side["optimizer_param_groups"] = full_meta.get("optimizer", {}).get("param_groups")
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(side, indent=1, default=str).encode())
    prune(directory, keep, keep_best, protect=path)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in write order (oldest first), by their sequence number."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_meta(path: Path) -> dict[str, Any]:
    """The rmn metadata of a checkpoint, from its header alone (cheap; a truncated file fails here,
    since safetensors checks that the header's tensors cover the file exactly)."""
    path = Path(path)
    if not path.is_file():
        raise _bad(path, "checkpoint not found")
    if path.stat().st_size == 0:
        raise _bad(path, "empty file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        why = _first_line(e).replace("Error while deserializing header: ", "")
        raise _bad(path, f"cut short or not safetensors ({why})") from None
    if "rmn" not in header:
        raise _bad(path, "safetensors file without rmn metadata (not an rmn checkpoint)")
    try:
        meta = json.loads(header["rmn"])
    except json.JSONDecodeError as e:
        raise _bad(path, f"rmn metadata is not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict):
        raise _bad(path, "rmn metadata is not a JSON object")
    if meta.get("format") != FORMAT:
        raise _bad(path, f"unsupported checkpoint format {meta.get('format')!r}")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise _bad(path, f"rmn metadata lacks {', '.join(missing)}")
    if meta["phase"] not in PHASES:
        raise _bad(path, f"unknown phase {meta['phase']!r} in its metadata")
    bad = [k for k in ("seq", "epoch", "step") if not isinstance(meta[k], int) or isinstance(meta[k], bool) or meta[k] < 0]
    if bad:
        raise _bad(path, f"{', '.join(bad)} in its metadata not a count")
    return meta


def is_plain_safetensors(path: Path) -> bool:
    """Whether ``path`` is a readable safetensors file *without* rmn's metadata: a plain state dict, not
    an rmn checkpoint (a damaged file is neither; :func:`load_checkpoint` says what is wrong with it)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return "rmn" not in (f.metadata() or {})
    except Exception:  # missing, cut short, not safetensors
        return False


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    meta = read_meta(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise _bad(path, f"tensors unreadable ({_first_line(e)})") from None
    model_state = {k[len("model."):]: v.to(device) for k, v in tensors.items() if k.startswith("model.")}
    opt_tensors = {k: v.to(device) for k, v in tensors.items() if k.startswith("optim.")}
    try:
        opt = _optimizer_join(meta["optimizer"], opt_tensors) if "optimizer" in meta else None
    except (KeyError, TypeError, AttributeError) as e:
        raise _bad(path, f"optimizer state does not match its tensors ({type(e).__name__}: {_first_line(e)})") from None
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    return Checkpoint(path, meta, model_state, opt, rng)


def newest_checkpoint(directory: Path, device: str | torch.device = "cpu") -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest checkpoint in ``directory`` that loads, and the newer files skipped with the reason."""
    skipped = []
    for path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path, device), skipped
        except CheckpointError as e:
            skipped.append((path, e.reason))
    return None, skipped


def latest_checkpoint(directory: Path, device: str | torch.device = "cpu") -> Checkpoint | None:
    """The newest checkpoint in ``directory`` that loads; damaged newer files are skipped."""
    return newest_checkpoint(directory, device)[0]


def describe_skipped(skipped: list[tuple[Path, str]]) -> str:
    """'a.safetensors: why; b.safetensors: why' for messages."""
    return "; ".join(f"{p.name}: {why}" for p, why in skipped)


def set_aside(paths: list[Path]) -> Path | None:
    """Move damaged checkpoint files (and their .json side-cars) into ``checkpoints/unreadable/``:
    out of the way of new checkpoints with the same sequence numbers, but never deleted."""
    if not paths:
        return None
    target = Path(paths[0]).parent / UNREADABLE_DIR
    target.mkdir(exist_ok=True)
    for p in paths:
        for f in (Path(p), Path(p).with_suffix(".json")):
            if f.exists():
                dest = target / f.name
                n = 1
                while dest.exists():
                    dest = target / f"{f.name}.{n}"
                    n += 1
                shutil.move(str(f), str(dest))
    return target


def _readable(directory: Path) -> list[tuple[Path, dict]]:
    """(path, metadata) of every checkpoint whose header reads, oldest first."""
    found = []
    for p in list_checkpoints(directory):
        try:
            found.append((p, read_meta(p)))
        except CheckpointError:
            continue
    return found


def _best(readable: list[tuple[Path, dict]]) -> Path | None:
    scored = [(m["eval_top1"], m["seq"], p) for p, m in readable if isinstance(m.get("eval_top1"), (int, float))]
    return max(scored)[2] if scored else None  # ties go to the newer checkpoint


def newest_readable(directory: Path) -> Path | None:
    """The newest checkpoint file whose header reads (no tensors loaded)."""
    found = _readable(directory)
    return found[-1][0] if found else None


def best_checkpoint(directory: Path) -> Path | None:
    """The readable checkpoint with the highest ``eval_top1`` recorded in its metadata."""
    return _best(_readable(directory))


def prune(directory: Path, keep: int, keep_best: bool = False, protect: Path | None = None) -> list[Path]:
    """Delete readable checkpoints beyond the newest ``keep`` readable ones (and, with ``keep_best``, the
    one with the best ``eval_top1``). Unreadable files are never counted as kept, and never deleted here."""
    readable = _readable(directory)
    kept = {p for p, _ in readable[-keep:]} | ({Path(protect)} if protect is not None else set())
    if keep_best and (best := _best(readable)) is not None:
        kept.add(best)
    removed = []
    for p, _ in readable:
        if p not in kept:
            p.unlink(missing_ok=True)
            p.with_suffix(".json").unlink(missing_ok=True)
            removed.append(p)
    return removed


def load_model_state(model: torch.nn.Module, ckpt: Checkpoint) -> None:
    """``model.load_state_dict`` that names the checkpoint and says in one line how its tensors and the
    model its header describes disagree (instead of a KeyError or a page of size mismatches)."""
    want = model.state_dict()
    got = legacy_renamed(ckpt.model_state, model) or ckpt.model_state
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    shapes = [k for k in want if k in got and tuple(got[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        cfg = ckpt.meta.get("config", {}).get("model", {}) if isinstance(ckpt.meta.get("config"), dict) else {}
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(shapes)} of another shape (e.g. {shapes[0]}: {tuple(got[shapes[0]].shape)} for "
                 f"{tuple(want[shapes[0]].shape)})" if shapes else ""]
        raise _bad(ckpt.path, f"its tensors do not fit the {cfg.get('backbone', '?')} model its header describes "
                              f"(phase {ckpt.meta.get('phase')!r}); weights " + ", ".join(x for x in parts if x))
    model.load_state_dict(got)


LEGACY_SECTIONS = ("stem", "stages", "head")


def legacy_renamed(got: dict, model: torch.nn.Module) -> dict | None:
    """A checkpoint of rmn 0.1 (``stem.* / stages.i.* / head.*``: the layout of its ``RoutedNetwork``, before
    the backbones kept torchvision's names) under the names of ``model``; None for any other checkpoint.
    The backbone lists what 0.1 called its stem and head (``stem_modules``), the routed stages are
    ``model.rmn_routing.stages``: every old name maps to exactly one new one."""
    if not got or not all(k.split(".", 1)[0] in LEGACY_SECTIONS for k in got):
        return None
    stem, head = getattr(model, "stem_modules", None), getattr(model, "head_modules", None)
    routing = getattr(model, "rmn_routing", None)
    if stem is None or head is None or routing is None:
        return None
    where = {id(m): name for name, m in model.named_modules()}
    names: dict[str, str] = {}
    for section, modules in (("stem", stem()), ("head", head())):
        for j, m in enumerate(modules):
            if id(m) in where:  # a module made on the fly (nn.Flatten) holds no tensor
                names.update({f"{section}.{j}.{k}": f"{where[id(m)]}.{k}" for k in m.state_dict()})
    for i, stage in enumerate(routing.stages):
        names.update({f"stages.{i}.{k}": f"{stage}.{k}" for k in model.get_submodule(stage).state_dict()})
    if set(got) != set(names):
        return None
    return {names[k]: v for k, v in got.items()}


def checkpoint_config(ckpt: Checkpoint):
    """The config stored in ``ckpt``, or a CheckpointError naming the file when it is not one rmn reads."""
    from .config import ConfigError, from_dict

    raw = ckpt.meta.get("config")
    if not isinstance(raw, dict):
        raise _bad(ckpt.path, "its metadata holds no config mapping")
    try:
        return from_dict(raw).validate()
    except ConfigError as e:
        raise _bad(ckpt.path, f"its stored config is not valid ({e})") from None
