"""benchmarks/ops_in_context.py: its hooks do their work and leave the network's output as it is."""
import torch

from rmn.analysis.latency import build_variants, varied_images


def test_hooks_run_at_every_stage_and_leave_the_output_unchanged(load_benchmark):
    bench = load_benchmark("ops_in_context")
    plain = build_variants("resnet18", 32, num_classes=10, variants=("backbone",))["backbone"]
    x = varied_images(3, 32)
    models, alone = bench.hooked_models(plain, x[:1])
    assert set(alone) == set(models) - {"plain"} and all(us > 0 for us in alone.values())
    calls = []
    for key, m in models.items():
        for n in bench.STAGES:
            stage = m.get_submodule(n)
            hooks = stage._forward_pre_hooks if "Attention" not in key else stage._forward_hooks
            assert len(hooks) == (0 if key == "plain" else 1), (key, n)
            stage.register_forward_hook(lambda *_: calls.append(1))
    with torch.inference_mode():  # batch 1, as the benchmark runs (a route is read as one number)
        for i in range(3):
            want = plain(x[i:i + 1])
            for key, m in models.items():
                assert torch.equal(m(x[i:i + 1]), want), key  # computed and thrown away
    assert len(calls) == 3 * len(models) * len(bench.STAGES)
