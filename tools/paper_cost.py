"""Measured multiply-adds per image of every paper config, and the GPU-hours they imply.

    .venv/bin/python tools/paper_cost.py        # -> results/paper_cost.json + Markdown on stdout

For each config the real model (random weights, CPU) is built at its image size and its multiply-adds
per image are counted by executing it (rmn.analysis.cost.macs_per_image: FlopCounterMode, convs +
linears + matmuls, eval mode, on the path a sample really takes): the plain network of stem training
(and of the baseline) and the routed network after cloning.

Training compute of a run, in FLOPs (1 multiply-add = 2 FLOPs; backward = 2x forward, so a training
step costs 3x the forward):

    train  = 6 * images_per_epoch * (stem_epochs * MACs_stem + (epochs - stem_epochs) * MACs_routed)
             (baseline: 6 * images_per_epoch * epochs * MACs_stem)
    eval   = 2 * val_images * (stem_epochs * MACs_stem + (epochs - stem_epochs) * MACs_routed)   (every epoch)
    kmeans = 2 * train_images * MACs_stem                      (RMN only: the feature pass of step 3)

images_per_epoch = floor(train_images / batch) * batch (the loader drops the last partial batch).

GPU-hours = (train + eval + kmeans) / F / 3600, with F the sustained training FLOP/s of one GPU. We have
no GPU, so F is calibrated on a published measurement of the same kind of work: NVIDIA's
DeepLearningExamples ResNet-50 v1.5 PyTorch README (training performance, 1x A100 80GB, pytorch-21.03
NGC container) gives 938 img/s in TF32 and 2470 img/s in mixed precision. rmn trains in float32
(PyTorch runs cuDNN convolutions in TF32 on Ampere by default), so the TF32 figure applies:

    F = 938 img/s * 6 * MACs(ResNet-50, ImageNet, as measured here)

i.e. about 23 TFLOP/s, 15% of the A100's 156 TFLOP/s dense TF32 peak. Wall-clock on 8 GPUs divides the
GPU-hours by 7.72, NVIDIA's measured 8-GPU TF32 scaling for the same model (7248 / 938 img/s).
Not included, so the estimate is a lower bound: data loading (NVIDIA uses DALI; rmn decodes with
Pillow in worker processes), the routing overhead (grouped dispatch, memory updates, synchronised BN
over every procedure), and the lower efficiency of depthwise convolutions (EfficientNet-B0) and of
32x32 / 64x64 images relative to ResNet-50 at 224x224.

GPU memory per GPU when 8 GPUs share the batch (float32):
    weights + gradients + optimizer state: 12 bytes/parameter with SGD (momentum buffer), 16 with
    RMSprop (square average + momentum buffer);
    activations: the bytes autograd saves for backward per image, measured here on the plain network in
    training mode (torch.autograd.graph.saved_tensors_hooks, distinct storages, parameters excluded),
    times batch / 8. A routed network saves the same per image (one procedure per sample) plus the
    dispatch's gather/scatter copies; cuDNN workspaces and the allocator's slack are not counted.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from rmn.analysis.cost import count_params, macs_per_image
from rmn.data import dataset_spec
from rmn.recipe.build import build_stem_network, clone_network, optimizer_kind
from rmn.recipe.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"
OUT = ROOT / "results" / "paper_cost.json"

# Official split sizes (CIFAR-100: 50,000 / 10,000; Tiny ImageNet: 100,000 / 10,000;
# ImageNet ILSVRC-2012: 1,281,167 / 50,000).
SPLITS = {"cifar100": (50_000, 10_000), "tiny-imagenet": (100_000, 10_000), "imagenet": (1_281_167, 50_000)}
NVIDIA_RN50_TF32_IMG_S = 938.0  # 1x A100 80GB, TF32, ResNet-50 v1.5 PyTorch (NVIDIA DeepLearningExamples)
NVIDIA_8GPU_SCALING = 7248.0 / 938.0  # 8x A100 80GB TF32 / 1x
A100_TF32_PEAK = 156e12


def _configs() -> list[str]:
    spec = importlib.util.spec_from_file_location("paper_configs", ROOT / "tools" / "paper_configs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return sorted(gen.render())


def activation_bytes_per_image(model: torch.nn.Module, shape, batch: int = 2) -> float:
    """Bytes of the distinct tensors autograd saves for backward, per image (training mode)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(saved.values()) / batch


def activations(cache: dict, cfg) -> float:
    m = cfg.model
    key = (cfg.data.dataset, cfg.data.image_size, m.backbone, m.attention, "activations")
    if key not in cache:
        spec = dataset_spec(cfg.data.dataset)
        torch.manual_seed(0)
        model = build_stem_network(cfg, spec, cfg.data.image_size)
        cache[key] = activation_bytes_per_image(model, (spec.in_channels, cfg.data.image_size, cfg.data.image_size))
        del model
    return cache[key]


def measure(cache: dict, cfg, phase: str) -> tuple[float, int]:
    """(MACs per image, parameters) of the config's network in ``phase`` ("stem" or "routed")."""
    m = cfg.model
    n = m.num_procedures if (phase == "routed" or m.attention == "ca") else 1
    key = (cfg.data.dataset, cfg.data.image_size, m.backbone, m.attention, n, phase)
    if key not in cache:
        spec = dataset_spec(cfg.data.dataset)
        torch.manual_seed(0)
        model = build_stem_network(cfg, spec, cfg.data.image_size)
        if phase == "routed":
            model = clone_network(cfg, model)
        model.eval()
        shape = (spec.in_channels, cfg.data.image_size, cfg.data.image_size)
        cache[key] = (macs_per_image(model, shape, batch=2), count_params(model))
        del model
    return cache[key]


def estimate(rel: str, cfg, cache: dict, flops_per_s: float) -> dict:
    n_train, n_val = SPLITS[cfg.data.dataset]
    e, e0, b = cfg.schedule.epochs, cfg.schedule.stem_epochs, cfg.data.batch_size
    per_epoch = n_train // b * b
    macs_stem, params_stem = measure(cache, cfg, "stem")
    rmn = cfg.run.mode == "rmn"
    if rmn:
        macs_routed, params = measure(cache, cfg, "routed")
        forward_macs = e0 * macs_stem + (e - e0) * macs_routed
        kmeans = 2 * n_train * macs_stem
    else:
        macs_routed, params = macs_stem, params_stem
        forward_macs = e * macs_stem
        kmeans = 0.0
    train = 6 * per_epoch * forward_macs
    evaluation = 2 * n_val * forward_macs
    total = train + evaluation + kmeans
    gpu_hours = total / flops_per_s / 3600
    state_bytes = 16 if optimizer_kind(cfg) == "rmsprop" else 12
    act = activations(cache, cfg)
    state_gb = params * state_bytes / 1e9
    act_gb = act * b / 8 / 1e9
    return {
        "config": f"configs/paper/{rel}",
        "mode": cfg.run.mode, "dataset": cfg.data.dataset, "backbone": cfg.model.backbone,
        "attention": cfg.model.attention, "num_procedures": cfg.model.num_procedures,
        "batch_size": b, "epochs": e, "stem_epochs": e0 if rmn else None,
        "params": params, "params_M": round(params / 1e6, 2),
        "macs_stem_G": round(macs_stem / 1e9, 4), "macs_routed_G": round(macs_routed / 1e9, 4),
        "train_pflop": round(train / 1e15, 1), "eval_pflop": round(evaluation / 1e15, 1),
        "kmeans_pflop": round(kmeans / 1e15, 2), "total_pflop": round(total / 1e15, 1),
        "a100_gpu_hours": round(gpu_hours, 2),
        "wallclock_hours_8xa100": round(gpu_hours / NVIDIA_8GPU_SCALING, 2),
        "weights_grads_optimizer_GB": round(state_gb, 2),
        "activation_MB_per_image": round(act / 1e6, 2),
        "per_gpu_GB_at_8_gpus": round(state_gb + act_gb, 1),
    }


def markdown(rows: list[dict]) -> str:
    head = ("| config | params (M) | MACs/img stem -> routed (G) | PFLOP | A100 GPU-h | 8xA100 h | "
            "weights+grads+opt (GB) | activations (MB/img) | per GPU at 8 GPUs (GB) |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| `{r['config']}` | {r['params_M']} | {r['macs_stem_G']} -> {r['macs_routed_G']} | "
                     f"{r['total_pflop']} | {r['a100_gpu_hours']} | {r['wallclock_hours_8xa100']} | "
                     f"{r['weights_grads_optimizer_GB']} | {r['activation_MB_per_image']} | {r['per_gpu_GB_at_8_gpus']} |")
    return "\n".join(lines)


def main() -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    cache: dict = {}
    ref = load_config(overrides={"model.backbone": "resnet50", "model.attention": "none", "data.dataset": "imagenet",
                                 "data.image_size": 224})
    rn50_macs, _ = measure(cache, ref, "stem")
    flops_per_s = NVIDIA_RN50_TF32_IMG_S * 6 * rn50_macs
    rows = []
    for rel in _configs():
        cfg = load_config(PAPER / rel)
        rows.append(estimate(rel, cfg, cache, flops_per_s))
        print(f"[{time.perf_counter() - t0:6.1f}s] {rel}: {rows[-1]['a100_gpu_hours']} GPU-h", file=sys.stderr)
    meta = {
        "command": "python tools/paper_cost.py",
        "resnet50_imagenet_macs": rn50_macs,
        "nvidia_resnet50_tf32_img_per_s_1xA100": NVIDIA_RN50_TF32_IMG_S,
        "sustained_flop_per_s": flops_per_s,
        "fraction_of_a100_tf32_peak": round(flops_per_s / A100_TF32_PEAK, 3),
        "eight_gpu_scaling": round(NVIDIA_8GPU_SCALING, 3),
        "splits": SPLITS,
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    OUT.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"F = 938 img/s x 6 x {rn50_macs / 1e9:.3f} GMACs = {flops_per_s / 1e12:.1f} TFLOP/s "
          f"({flops_per_s / A100_TF32_PEAK:.1%} of the A100 TF32 peak)")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
