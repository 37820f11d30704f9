"""Every config under configs/paper: the paper's hyper-parameters, its model, its data pipeline.

Nothing is trained. Models are built on the meta device (real architecture, no memory), so the
138M-parameter VGG-16 and its 8-procedure clones cost nothing; the data pipeline runs on fixtures
written in the releases' real on-disk formats (the writers of tests/test_data_*.py). The expected
values below are written out from docs/method.md section 6 on purpose, independently of
tools/paper_configs.py, so a wrong generator cannot agree with itself.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from rmn.analysis.cost import count_params
from rmn.data import dataset_spec
from rmn.recipe.build import build_data, build_loaders, build_model, build_stem_network, clone_network, optimizer_kind
from rmn.recipe.config import load_config
from rmn.syncbn import convert_sync_batchnorm
from test_data_cifar import write_cifar100
from test_data_images import write_imagenet, write_tiny
from rmn.route import is_routed, routed_stages

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"
FILES = sorted(p.relative_to(PAPER).as_posix() for p in PAPER.rglob("*.yaml"))

# --- the paper's values (docs/method.md sections 2, 6 and 8) ---------------------------------------
DATASET = {"cifar100": ("cifar100", 32), "tiny_imagenet": ("tiny-imagenet", 64), "imagenet": ("imagenet", 224)}
EPOCHS = {
    "cifar100": {"vgg16": 120, "resnet18": 120, "resnet50": 200, "efficientnet_b0": 300},
    "tiny_imagenet": {"vgg16": 120, "resnet18": 120, "resnet50": 200, "efficientnet_b0": 300},
    "imagenet": {"vgg16": 160, "resnet18": 160, "resnet50": 220, "efficientnet_b0": 400},
}
ROUTED_STAGES = {"vgg16": 4, "resnet18": 4, "resnet50": 4, "efficientnet_b0": 5}
# variant -> (run.mode, model.attention, N, batch, alpha)
VARIANTS = {
    "baseline": ("baseline", "none", 1, 256, 0.9),
    "baseline_b1024": ("baseline", "none", 1, 1024, 0.9),
    "rmn": ("rmn", "none", 8, 1024, 0.9),
    "rmn_ca": ("rmn", "ca", 8, 1024, 0.9),
}
ABLATIONS = {  # ResNet-18, Tiny ImageNet; the centre point N=8 / batch 1024 / alpha 0.9 is resnet18_rmn_ca
    "se": ("baseline", "se", 1, 256, 0.9),
    "rmn_se": ("rmn", "se", 8, 1024, 0.9),
    "rmn_ca_n1": ("rmn", "ca", 1, 128, 0.9),  # batch 256 * N / 2
    "rmn_ca_n2": ("rmn", "ca", 2, 256, 0.9),
    "rmn_ca_n4": ("rmn", "ca", 4, 512, 0.9),
    "rmn_ca_n16": ("rmn", "ca", 16, 2048, 0.9),
    "rmn_ca_b128": ("rmn", "ca", 8, 128, 0.9),
    "rmn_ca_b256": ("rmn", "ca", 8, 256, 0.9),
    "rmn_ca_b2048": ("rmn", "ca", 8, 2048, 0.9),
    "rmn_ca_alpha0.5": ("rmn", "ca", 8, 1024, 0.5),
    "rmn_ca_alpha0.7": ("rmn", "ca", 8, 1024, 0.7),
    "rmn_ca_alpha0.99": ("rmn", "ca", 8, 1024, 0.99),
}
# Parameter counts the paper gives: Table 3 (ImageNet-size backbones) and the CA ablation
# (ResNet-18, Tiny ImageNet: 11.3M -> 89.5M with CA).
PAPER_PARAMS = {
    "imagenet/resnet18_baseline.yaml": 11.7e6,
    "imagenet/resnet50_baseline.yaml": 25.6e6,
    "imagenet/efficientnet_b0_baseline.yaml": 5.3e6,
    "imagenet/vgg16_baseline.yaml": 138.3e6,
    "tiny_imagenet/resnet18_baseline.yaml": 11.3e6,
    "tiny_imagenet/resnet18_rmn_ca.yaml": 89.5e6,
}


def expected(rel: str) -> dict:
    folder, *mid, name = rel[: -len(".yaml")].split("/")
    model, variant = re.fullmatch(r"(vgg16|resnet18|resnet50|efficientnet_b0)_(.+)", name).groups()
    if mid == ["ablations"]:
        assert folder == "tiny_imagenet" and model == "resnet18", rel
        table = ABLATIONS
    else:
        assert not mid, rel
        table = VARIANTS
    assert variant in table, f"{rel}: unknown variant {variant!r}"
    mode, attention, n, batch, alpha = table[variant]
    dataset, size = DATASET[folder]
    return dict(folder=folder, model=model, variant=variant, mode=mode, attention=attention, n=n, batch=batch,
                alpha=alpha, dataset=dataset, size=size, epochs=EPOCHS[folder][model])


def test_the_expected_set_of_configs_exists():
    main = {f"{d}/{m}_{v}.yaml" for d in DATASET for m in EPOCHS[d] for v in VARIANTS}
    ablations = {f"tiny_imagenet/ablations/resnet18_{v}.yaml" for v in ABLATIONS}
    assert set(FILES) == main | ablations
    assert len(FILES) == 48 + 12


def test_files_equal_the_generator_output():
    files = _load_script("paper_configs").render()
    assert sorted(files) == FILES, "run: python tools/paper_configs.py"
    stale = [rel for rel in FILES if (PAPER / rel).read_text() != files[rel]]
    assert not stale, f"edited by hand or generator changed; run python tools/paper_configs.py: {stale}"


def test_run_names_are_unique():
    names = [load_config(PAPER / rel).run.name for rel in FILES]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("rel", FILES)
def test_hyper_parameters(rel):
    e = expected(rel)
    cfg = load_config(PAPER / rel)
    m, d, o, s, r = cfg.model, cfg.data, cfg.optim, cfg.schedule, cfg.run
    assert (m.backbone, m.width_mult, m.attention, m.num_procedures) == (e["model"], 1.0, e["attention"], e["n"])
    assert m.routed_stages is None and m.memory_momentum == e["alpha"] and m.attention_reduction == 16
    assert m.drop_path_rate is None
    assert (d.dataset, d.image_size, d.batch_size, d.micro_batch_size) == (e["dataset"], e["size"], e["batch"], None)
    assert d.augment and d.root is None and not d.download
    assert d.workers == (0 if e["dataset"] == "cifar100" else 8)
    assert (o.lr, o.start_lr, o.end_lr, o.warmup_epochs) == (0.48, 1e-5, 1e-5, 5.0)
    assert (o.momentum, o.weight_decay, o.label_smoothing) == (0.9, 1e-5, 0.0)
    want_opt = "rmsprop" if e["model"] == "efficientnet_b0" else "sgd"
    assert o.optimizer == want_opt and optimizer_kind(cfg) == want_opt
    assert (s.epochs, s.stem_epochs) == (e["epochs"], 40)
    assert (r.mode, r.sync_bn, r.seed) == (e["mode"], True, 0)
    assert r.name.startswith("paper-") and e["folder"] in r.name and e["variant"] in r.name


@pytest.mark.parametrize("rel", FILES)
def test_model_builds(rel):
    e = expected(rel)
    cfg = load_config(PAPER / rel)
    spec = dataset_spec(cfg.data.dataset)  # the real class count (the fixtures have fewer classes)
    n = e["n"]
    with torch.device("meta"):
        stem = build_stem_network(cfg, spec, cfg.data.image_size)  # = build_model(..., "stem")
        routed = clone_network(cfg, stem) if e["mode"] == "rmn" else None  # = build_model(..., "cloned")
        convert_sync_batchnorm(routed or stem)
    assert len(routed_stages(stem)) == ROUTED_STAGES[e["model"]] and not is_routed(stem)
    for st in routed_stages(stem):
        if e["attention"] == "none":
            assert st.attention is None
        else:  # CA during stem training takes N random routes; SE takes none
            assert st.attention.num_routes == (n if e["attention"] == "ca" else 0)
            assert st.attention.reduction == 16
    stem_params = count_params(stem)
    if e["mode"] == "baseline":
        total = stem_params
    else:
        assert is_routed(routed) and len(routed_stages(routed)) == len(routed_stages(stem))
        per_stage = [count_params(st.procedures[0]) for st in routed_stages(stem)]
        for st, size in zip(routed_stages(routed), per_stage):
            assert st.num_procedures == n and len(st.procedures) == n
            assert st.memory.num_memories == n and st.memory.momentum == e["alpha"]
            assert all(count_params(p) == size for p in st.procedures)
        total = count_params(routed)
        # cloning multiplies the stages only: the stem, the head and the shared CA stay single
        assert total == stem_params + (n - 1) * sum(per_stage)
    if rel in PAPER_PARAMS:
        assert total == pytest.approx(PAPER_PARAMS[rel], rel=0.01), (rel, total)


# --- data pipelines on fixtures in the real formats ----------------------------------------------
@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("paper_data")
    write_cifar100(base / "cifar100")
    write_tiny(base / "tiny")
    write_imagenet(base / "imagenet", flat_val=False)
    return {"cifar100": base / "cifar100", "tiny-imagenet": base / "tiny", "imagenet": base / "imagenet"}


def small_config(rel, roots, workers=None):
    """The config pointed at a fixture, with batches small enough for its dozen images."""
    cfg = load_config(PAPER / rel)
    over = {"data.root": str(roots[cfg.data.dataset]), "data.batch_size": 4, "data.eval_batch_size": 3}
    if workers is not None:
        over["data.workers"] = workers
    return cfg, load_config(PAPER / rel, over)


@pytest.mark.parametrize("rel", FILES)
def test_data_pipeline(rel, roots):
    cfg, small = small_config(rel, roots, workers=0)  # the configured 8 workers run in the test below
    data = build_data(small)
    size = cfg.data.image_size
    assert data.image_size == size and data.spec.name == cfg.data.dataset
    # The configured batch is per optimizer step over all processes: 8 GPUs share it.
    assert cfg.data.batch_size % 8 == 0
    train, evl, feats = build_loaders(small, data, torch.device("cpu"))
    mean = torch.tensor(data.spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.spec.std).view(1, -1, 1, 1)
    x, y = next(iter(train))
    assert x.shape == (4, 3, size, size) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < data.spec.num_classes
    pixels = x * std + mean  # undoing the normalisation gives pixels in [0, 1] (random crops: zero padding)
    assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4 and x.min() < -0.5
    xe, ye = next(iter(evl))
    assert xe.shape == (3, 3, size, size) and next(iter(feats))[0].shape == (3, 3, size, size)
    if data.spec.augmentation == "pad-crop":  # CIFAR, Tiny ImageNet: evaluation is the image itself, normalised
        raw = torch.stack([data.eval[i][0] for i in range(3)])
        torch.testing.assert_close(xe, (raw - mean) / std, atol=1e-5, rtol=0)
        assert ye.tolist() == [int(data.eval[i][1]) for i in range(3)]


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize("folder", list(DATASET))
def test_routed_model_takes_a_batch_from_its_pipeline(folder, roots):
    """The real (not meta) RMN with CA, fed one batch from its own pipeline (configured worker count)."""
    rel = f"{folder}/resnet18_rmn_ca.yaml"
    _, small = small_config(rel, roots)
    data = build_data(small)
    torch.manual_seed(0)
    model = build_model(small, data.spec, data.image_size, "cloned")
    x, y = next(iter(build_loaders(small, data, torch.device("cpu"))[0]))
    model.train()
    out = model(x)
    assert out.shape == (4, data.spec.num_classes) and torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, y).backward()


def test_reproduction_md_names_every_config():
    text = (ROOT / "REPRODUCTION.md").read_text()
    named = set(re.findall(r"configs/paper/([\w./]+?\.yaml)", text))
    assert named <= set(FILES), f"REPRODUCTION.md names configs that do not exist: {sorted(named - set(FILES))}"
    assert set(FILES) <= named, f"configs missing from REPRODUCTION.md: {sorted(set(FILES) - named)}"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cost_estimate_covers_every_config_and_matches_it():
    """results/paper_cost.json (tools/paper_cost.py) is current: one row per config, with its batch and epochs."""
    import json

    rows = {r["config"]: r for r in json.loads((ROOT / "results" / "paper_cost.json").read_text())["rows"]}
    assert set(rows) == {f"configs/paper/{rel}" for rel in FILES}, "run: python tools/paper_cost.py"
    for rel in FILES:
        cfg, r = load_config(PAPER / rel), rows[f"configs/paper/{rel}"]
        assert (r["batch_size"], r["epochs"], r["num_procedures"], r["attention"]) == (
            cfg.data.batch_size, cfg.schedule.epochs, cfg.model.num_procedures, cfg.model.attention), rel
    assert rows["configs/paper/tiny_imagenet/resnet18_rmn_ca.yaml"]["params_M"] == pytest.approx(89.5, rel=0.01)


def test_reproduction_md_tables_are_current():
    tables = _load_script("reproduction_tables")
    assert tables.current() == tables.render(), "run: python tools/reproduction_tables.py --write"
    text = (ROOT / "REPRODUCTION.md").read_text()
    assert "## CPU-scale study: Fashion-MNIST" in text
    # every table the Fashion-MNIST study scripts wrote (regenerated from the per-run results) is quoted verbatim
    tables = sorted((ROOT / "results" / "fashion_study").glob("*.md"))
    assert {t.name for t in tables} >= {"table.md", "small_batch.md", "investigation.md"}
    for t in tables:
        assert t.read_text().strip() in text, f"{t.name} is not in REPRODUCTION.md as written"
