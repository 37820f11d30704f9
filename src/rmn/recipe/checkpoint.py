"""Crash-safe checkpoints: one safetensors file per checkpoint, plus a JSON side-car for people.

The safetensors file holds the model weights, the optimizer's tensors and the RNG states; its
header metadata holds everything else as JSON (config, phase, epoch, step, optimizer param groups).
Loading never unpickles anything. Files are written to a temporary name, flushed and renamed, so
a kill at any moment leaves either the previous checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

FORMAT = "rmn-checkpoint-1"
NAME = re.compile(r"^ckpt-(\d{5})-([a-z]+)-e(\d+)\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file."""


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
) -> Path:
    """Write checkpoint number ``seq`` and prune all but the newest ``keep``."""
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
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in write order (oldest first), by their sequence number."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})") from None
    if "rmn" not in header:
        raise CheckpointError(f"{path}: safetensors file without rmn metadata (not an rmn checkpoint)")
    meta = json.loads(header["rmn"])
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r}")
    model_state = {k[len("model."):]: v.to(device) for k, v in tensors.items() if k.startswith("model.")}
    opt_tensors = {k: v.to(device) for k, v in tensors.items() if k.startswith("optim.")}
    opt = _optimizer_join(meta["optimizer"], opt_tensors) if "optimizer" in meta else None
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    return Checkpoint(path, meta, model_state, opt, rng)


def latest_checkpoint(directory: Path, device: str | torch.device = "cpu") -> Checkpoint | None:
    """The newest checkpoint in ``directory`` that loads; damaged newer files are skipped."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path, device)
        except CheckpointError:
            continue
    return None
