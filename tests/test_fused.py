"""rmn.fused: the compiled batch-1 inference ops against the reference path they replace."""
import copy
import pickle

import pytest
import torch

import rmn
from rmn import fused
from rmn.analysis.calibrate import calibrate_memories
from rmn.analysis.latency import varied_images
from rmn.route import routed_stages

needs_build = pytest.mark.skipif(fused.load() is None, reason=f"fused ops not buildable here: {fused.build_error()}")


def _routed(attention):
    torch.manual_seed(0)
    net = rmn.route(rmn.create_backbone("resnet18", 10, image_size=64, width_mult=0.25), num_procedures=4,
                    attention=attention, attention_init="random").eval()
    calibrate_memories(net, varied_images(32, 64), method="kmeans", seed=0)
    return net


@needs_build
@pytest.mark.parametrize("attention", ["ca", "se", "none"])
def test_fused_batch1_inference_matches_the_reference_path(attention):
    net = _routed(attention)
    images = varied_images(12, 64, seed=1)
    with torch.inference_mode():
        want = [(net(images[i:i + 1]), rmn.last_routes(net)) for i in range(12)]
        rmn.fuse_for_inference(net)
        assert all(s.fused for s in routed_stages(net))
        net = copy.deepcopy(net)  # a fused model still copies (and pickles): it holds a flag, not the ops
        got = [(net(images[i:i + 1]), rmn.last_routes(net)) for i in range(12)]
    assert len({tuple(r.flatten().tolist()) for _, r in want}) > 1  # routes vary between images
    for (y0, r0), (y1, r1) in zip(want, got):
        assert torch.equal(r0, r1)
        torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    assert pickle.loads(pickle.dumps(net)) is not None
    rmn.fuse_for_inference(net, on=False)
    with torch.inference_mode():
        assert torch.equal(net(images[:1]), want[0][0])  # the reference path, bit for bit


@needs_build
def test_everything_but_batch1_eval_takes_the_reference_path_unchanged():
    net = _routed("ca")
    ref = _routed("ca")
    rmn.fuse_for_inference(net)
    x = varied_images(4, 64, seed=2)
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))  # a batch of 4
        assert torch.equal(net(x[:1].contiguous(memory_format=torch.channels_last)),
                           ref(x[:1].contiguous(memory_format=torch.channels_last)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(net(x[:1]), ref(x[:1]))
    net.train(), ref.train()
    rmn.set_auto_update(net, False), rmn.set_auto_update(ref, False)
    torch.manual_seed(3)
    a = net(x[:2])
    torch.manual_seed(3)
    b = ref(x[:2])
    assert torch.equal(a, b)  # training, with autograd


def test_fuse_for_inference_says_in_one_line_why_it_cannot_build(monkeypatch):
    monkeypatch.setattr(fused, "_built", {"error": "MissingExtra: rmn.fuse_for_inference needs ninja"})
    with pytest.raises(RuntimeError, match=r"could not be built here \(MissingExtra: .*needs ninja\).*rmn\[fused\]"):
        rmn.fuse_for_inference(_routed("ca"))
