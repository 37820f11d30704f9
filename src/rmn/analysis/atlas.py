"""The memory atlas: what each memory of a trained RMN gathers (the paper's supplementary figure).

For every routed stage, each memory's top-K nearest evaluation images -- nearest by the Euclidean
distance between the image's GAP'd stage input and the memory, i.e. the quantity routing minimises --
drawn as one PNG grid per stage (one row per memory, labelled with its index and load share), plus:

* ``stage{i}_classes.png``: class-by-memory routing heat map (share of each class's images routed to
  each memory; classes ordered by their favourite memory) -- needs labels;
* ``load.png``: routing-load bar charts, one panel per routed stage (dead memories in red);
* ``atlas.html``: one page showing all of it, ``atlas.json``: the numbers behind it.

Drawing needs the ``plots`` extra (matplotlib, Pillow), imported on use; :func:`nearest_images` needs neither.

The load share is the training load from ``MemoryBank.load`` when it holds any count, otherwise the
share of the evaluation images routed to each memory (the figures say which).
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from ..extras import require
from ..route import memory_banks
from .features import collect_stage_features
from .routing import class_memory_counts, load_stats, mean_purity, purity

# Grid geometry (pixels); see grid_size().
TILE = 64
PAD = 4
LABEL_W = 150
TITLE_H = 28


FEATURE = "the memory atlas"


def require_plotting(instead: str | None = None) -> None:
    """Raise :class:`rmn.extras.MissingExtra` now if the atlas could not be drawn (before any work is done)."""
    for module in ("matplotlib", "PIL.Image", "PIL.ImageDraw", "PIL.ImageFont"):
        require(module, extra="plots", feature=FEATURE, instead=instead)


def _pil(name: str):
    return require(f"PIL.{name}", extra="plots", feature=FEATURE)


def nearest_images(features: torch.Tensor, memories: torch.Tensor, k: int) -> torch.Tensor:
    """For each memory ``[N, C]``, the indices of the ``k`` rows of ``features`` ``[M, C]`` closest to
    it (Euclidean, computed in float64), nearest first; ties go to the lower index. ``[N, min(k, M)]``."""
    if features.dim() != 2 or memories.dim() != 2 or features.shape[1] != memories.shape[1]:
        raise ValueError(f"features [M, C] and memories [N, C] must agree, got {tuple(features.shape)} and {tuple(memories.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    f = features.detach().cpu().double()
    m = memories.detach().cpu().double()
    d = torch.cdist(m, f)  # [N, M]
    k = min(k, f.shape[0])
    return torch.sort(d, dim=1, stable=True).indices[:, :k]


def grid_size(num_memories: int, k: int) -> tuple[int, int]:
    """(width, height) in pixels of a stage grid with ``num_memories`` rows of ``k`` tiles."""
    return LABEL_W + k * (TILE + PAD) + PAD, TITLE_H + num_memories * (TILE + PAD) + PAD


def _font(size: int):
    ImageFont = _pil("ImageFont")
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _to_pil(img: torch.Tensor) -> "Image.Image":
    """``[C, H, W]`` in [0, 1] (C = 1 or 3) -> RGB tile of TILE x TILE pixels."""
    Image = _pil("Image")
    x = img.detach().cpu().float().clamp(0, 1)
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"display images must be [C, H, W] with C = 1 or 3, got {tuple(x.shape)}")
    arr = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[:, :, 0], "L").convert("RGB") if x.shape[0] == 1 else Image.fromarray(arr, "RGB")
    if pil.size != (TILE, TILE):
        up = pil.width <= TILE and TILE % pil.width == 0 and pil.height == pil.width
        pil = pil.resize((TILE, TILE), Image.NEAREST if up else Image.BILINEAR)
    return pil


def render_grid(
    display_images: torch.Tensor,
    indices: torch.Tensor,
    row_labels: Sequence[str],
    title: str,
    captions: Sequence[Sequence[str]] | None = None,
) -> "Image.Image":
    """One row per memory: ``row_labels[j]`` then the images ``indices[j]`` (optional tiny captions)."""
    Image, ImageDraw = _pil("Image"), _pil("ImageDraw")
    n, k = indices.shape
    w, h = grid_size(n, k)
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 6), title, fill="black", font=_font(15))
    small, label_font = _font(10), _font(13)
    for j in range(n):
        y = TITLE_H + j * (TILE + PAD)
        for line_no, line in enumerate(str(row_labels[j]).split("\n")):
            draw.text((PAD, y + 6 + 16 * line_no), line, fill="black", font=label_font)
        for c in range(k):
            x = LABEL_W + c * (TILE + PAD)
            canvas.paste(_to_pil(display_images[int(indices[j, c])]), (x, y))
            if captions is not None:
                cap = str(captions[j][c])[:10]
                draw.rectangle((x, y + TILE - 12, x + TILE, y + TILE), fill="white")
                draw.text((x + 2, y + TILE - 12), cap, fill="black", font=small)
    return canvas


def _plt():
    matplotlib = require("matplotlib", extra="plots", feature=FEATURE)
    matplotlib.use("Agg", force=False)
    return require("matplotlib.pyplot", extra="plots", feature=FEATURE)


def save_heatmap(counts: torch.Tensor, path: Path, title: str, class_names: Sequence[str] | None = None,
                 size: tuple[int, int] = (800, 600), dpi: int = 100) -> Path:
    """Class-by-memory heat map: row c = share of class c's images routed to each memory."""
    plt = _plt()
    c = counts.double()
    rows = c.sum(1, keepdim=True)
    share = torch.where(rows > 0, c / rows.clamp_min(1), torch.zeros_like(c))
    order = torch.argsort(share.argmax(1) * 2.0 - share.max(1).values, stable=True)  # group by favourite memory
    fig = plt.figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    ax = fig.add_axes([0.2, 0.1, 0.68, 0.8])
    im = ax.imshow(share[order].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("memory")
    ax.set_xticks(range(c.shape[1]))
    if class_names is not None and c.shape[0] <= 40:
        ax.set_yticks(range(c.shape[0]))
        ax.set_yticklabels([str(class_names[int(i)])[:18] for i in order], fontsize=7)
    else:
        ax.set_ylabel(f"class ({c.shape[0]}, sorted by favourite memory)")
    ax.set_title(title, fontsize=10)
    cax = fig.add_axes([0.9, 0.1, 0.02, 0.8])
    fig.colorbar(im, cax=cax, label="share of the class")
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def save_load_bars(stats: Sequence[tuple[int, dict[str, Any], str]], path: Path,
                   size: tuple[int, int] = (1000, 300), dpi: int = 100) -> Path:
    """One bar panel per routed stage: load share per memory; dead memories marked in red."""
    plt = _plt()
    fig = plt.figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    n = max(1, len(stats))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (stage, st, source) in zip(axes, stats):
        share = st["share"]
        colors = ["tab:red" if v == 0 else "tab:blue" for v in st["load"]]
        ax.bar(range(len(share)), share, color=colors)
        ax.axhline(1.0 / len(share), color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(share)))
        ax.set_ylim(0, max(share + [1.0 / len(share)]) * 1.15 or 1)
        ax.set_title(f"stage {stage} ({source})\nH={st['entropy']:.2f} dead={st['dead']}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(stats):]:
        ax.axis("off")
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.78, wspace=0.35)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


@torch.no_grad()
def memory_atlas(
    net: torch.nn.Module,
    images: torch.Tensor,
    display_images: torch.Tensor,
    labels: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    top_k: int = 8,
    out_dir: str | Path = "atlas",
    batch_size: int = 256,
    title: str = "RMN memory atlas",
) -> dict[str, Any]:
    """Write the atlas of ``net`` over ``images`` (normalised model inputs ``[M, C, H, W]``) into ``out_dir``.

    ``display_images`` are the same images in [0, 1] for drawing; ``labels`` ``[M]`` and
    ``class_names`` are optional (without labels there is no heat map and no purity).
    Returns ``{"html", "json", "load", "grids": {stage: path}, "heatmaps": {stage: path}, "nearest": {stage: LongTensor[N, k]}}``.
    """
    require_plotting()
    if images.shape[0] != display_images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {display_images.shape[0]} display images")
    if labels is not None and labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    banks = memory_banks(net)
    stages = [i for i, b in enumerate(banks) if b is not None]
    if not stages:
        raise ValueError("the network routes no stage: there are no memories to draw (clone it first)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    features, routes = collect_stage_features(net, images, batch_size=batch_size, path="routed")
    labels = None if labels is None else labels.detach().cpu().long()
    num_classes = None
    if labels is not None:
        num_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
    written: dict[str, Any] = {"grids": {}, "heatmaps": {}, "nearest": {}}
    summary: dict[str, Any] = {"title": title, "num_images": int(images.shape[0]), "top_k": top_k, "stages": []}
    bar_stats = []
    for i in stages:
        bank = banks[i]
        n = bank.num_memories
        eval_counts = torch.bincount(routes[i], minlength=n)
        if int(bank.load.sum()) > 0:
            st, source = load_stats(bank.load), "training load"
        else:
            st, source = load_stats(eval_counts), "eval routing"
        idx = nearest_images(features[i], bank.memories, top_k)
        written["nearest"][i] = idx
        labels_txt = [f"memory {j}\n{source.split()[0]} {100 * st['share'][j]:.1f}%" for j in range(n)]
        captions = None
        if labels is not None:
            names = class_names if class_names is not None else [str(c) for c in range(num_classes)]
            captions = [[names[int(labels[int(t)])] for t in row] for row in idx]
        grid = render_grid(display_images, idx, labels_txt,
                           f"{title}: stage {i}, top-{idx.shape[1]} nearest images per memory ({source} share)", captions)
        gpath = out / f"stage{i}_grid.png"
        grid.save(gpath)
        written["grids"][i] = gpath
        entry = {"stage": i, "share_source": source, "load": st, "eval_counts": eval_counts.tolist(),
                 "nearest": idx.tolist(), "grid": gpath.name}
        if labels is not None:
            counts = class_memory_counts(routes[i], labels, n, num_classes)
            hpath = save_heatmap(counts, out / f"stage{i}_classes.png",
                                 f"stage {i}: share of each class routed to each memory", class_names)
            written["heatmaps"][i] = hpath
            entry.update(heatmap=hpath.name, purity=purity(counts).tolist(), mean_purity=mean_purity(counts))
        summary["stages"].append(entry)
        bar_stats.append((i, st, source))
    written["load"] = save_load_bars(bar_stats, out / "load.png")
    jpath = out / "atlas.json"
    jpath.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    written["json"] = jpath
    written["html"] = _write_html(out / "atlas.html", summary, written["load"].name)
    return written


def _write_html(path: Path, summary: dict[str, Any], load_png: str) -> Path:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(summary['title'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}img{max-width:100%;border:1px solid #ccc}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style>",
        "</head><body>",
        f"<h1>{esc(summary['title'])}</h1>",
        f"<p>{summary['num_images']} evaluation images; each row of a grid shows one memory's "
        f"top-{summary['top_k']} nearest images by the distance between the image's GAP'd stage input "
        "and the memory (the quantity routing minimises).</p>",
        f"<h2>Routing load</h2><img src='{esc(load_png)}' alt='routing load'>",
    ]
    for st in summary["stages"]:
        i, load = st["stage"], st["load"]
        parts.append(f"<h2>Stage {i}</h2>")
        parts.append(f"<p>share from {esc(st['share_source'])}; normalised entropy {load['entropy']:.3f}; "
                     f"dead memories {load['dead']}; max/mean {load['max_over_mean']:.2f}"
                     + (f"; mean class purity {st['mean_purity']:.3f}" if "mean_purity" in st else "") + "</p>")
        row = "".join(f"<th>{j}</th>" for j in range(len(load["share"])))
        parts.append("<table><tr><th>memory</th>" + row + "</tr>")
        parts.append("<tr><th>share</th>" + "".join(f"<td>{100 * s:.1f}%</td>" for s in load["share"]) + "</tr>")
        parts.append("<tr><th>eval images</th>" + "".join(f"<td>{c}</td>" for c in st["eval_counts"]) + "</tr>")
        if "purity" in st:
            parts.append("<tr><th>purity</th>" + "".join(
                "<td>-</td>" if p != p else f"<td>{p:.2f}</td>" for p in st["purity"]) + "</tr>")
        parts.append("</table>")
        parts.append(f"<p><img src='{esc(st['grid'])}' alt='stage {i} grid'></p>")
        if "heatmap" in st:
            parts.append(f"<p><img src='{esc(st['heatmap'])}' alt='stage {i} class heat map'></p>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts) + "\n")
    return path


def atlas_inputs(dataset, max_images: int = 1024, image_size: int | None = None, batch_size: int = 256):
    """``(images, display_images, labels, class_names)`` from an :func:`rmn.data.build_dataset` set.

    In-memory sets give ``max_images`` evenly spaced samples (covering the classes of a sorted split);
    image-file sets the first ``max_images`` of the evaluation order. Images are normalised exactly as
    the evaluation loader does; display images undo the normalisation.
    """
    from ..data import build_loader
    from ..data.base import InMemoryDataset

    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    ds = dataset
    if hasattr(dataset, "images") and len(dataset) > max_images:
        idx = torch.linspace(0, len(dataset) - 1, max_images).round().long().unique()
        ds = InMemoryDataset(dataset.images[idx], dataset.targets[idx], dataset.classes, dataset.spec,
                             getattr(dataset, "split", "test"))
    loader = build_loader(ds, batch_size, train=False, augment=False, image_size=image_size)
    xs, ys, seen = [], [], 0
    for x, y in loader:
        xs.append(x.cpu())
        ys.append(y.cpu())
        seen += x.shape[0]
        if seen >= max_images:
            break
    images = torch.cat(xs)[:max_images]
    labels = torch.cat(ys)[:max_images]
    spec = dataset.spec
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    display = (images * std + mean).clamp(0, 1)
    return images, display, labels, list(getattr(dataset, "classes", [])) or None


def draw_atlas(model, dataset, out_dir: str | Path = "atlas", top_k: int = 8, max_images: int = 1024,
               image_size: int | None = None, title: str | None = None) -> dict[str, Any]:
    """The memory atlas of a routed ``model`` over ``dataset`` (from ``rmn.data.build_dataset``), as ``rmn atlas``
    draws it; prints where it went.

    ``image_size``: the side the model takes, when it differs from the dataset's (default: the
    model's ``info.image_size`` if it has one). Returns the written paths (see :func:`memory_atlas`).
    """
    if image_size is None:
        info = getattr(model, "info", None)
        size = getattr(info, "image_size", None)
        image_size = size if size and size != dataset.spec.image_size else None
    images, display, labels, names = atlas_inputs(dataset, max_images=max_images, image_size=image_size)
    title = title or f"RMN memory atlas ({dataset.spec.name}, {images.shape[0]} images)"
    written = memory_atlas(model, images, display, labels, names, top_k=top_k, out_dir=out_dir, title=title)
    print(f"wrote {written['html']} ({len(written['grids'])} stage grids, load chart, "
          f"{len(written['heatmaps'])} heat maps)")
    return written
