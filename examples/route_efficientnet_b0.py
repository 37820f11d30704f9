"""Route a torchvision EfficientNet-B0 with rmn in a plain PyTorch loop: stages as groups of ``features`` entries.

    pip install 'rmn[digits]' torchvision
    python examples/route_efficientnet_b0.py

EfficientNet has no ``layer1..4``: its ``features`` Sequential holds the stem (0), seven MBConv groups (1-7) and
the final 1x1 conv (8). A stage may be a group of consecutive entries; these five follow the resolution changes
(rmn's own EfficientNet-B0 uses the same split): the first entry of a group becomes the routed stage, whose
procedures run the whole group, and the others become ``nn.Identity``. This example routes a pretrained-style
model in one call (plain network and clone at once) and fine-tunes it; route_resnet18.py shows the four steps.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rmn  # noqa: E402
from loop import accuracy, loaders, options, train  # noqa: E402

STAGES = [["features.1"], ["features.2"], ["features.3"], ["features.4", "features.5"],
          ["features.6", "features.7", "features.8"]]


def main(argv: list[str] | None = None) -> dict:
    args = options(__doc__, procedures=4, lr=0.01, argv=argv)
    torch.manual_seed(0)
    train_loader, feature_loader, test_loader = loaders(args.image_size, args.batch_size)
    if args.pretrained:
        model = torchvision.models.efficientnet_b0(weights="DEFAULT")
        model.classifier[-1] = torch.nn.Linear(model.classifier[-1].in_features, 10)
    else:
        model = torchvision.models.efficientnet_b0(num_classes=10)

    net = rmn.route(model, STAGES, args.procedures, attention="ca")   # near-identity attention: a trained model survives
    sizes = rmn.init_memories(net, feature_loader).cluster_sizes      # memories from the model's own features
    opt = torch.optim.RMSprop(net.parameters(), lr=args.lr, alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=1e-5)
    loss = train(net, opt, train_loader, args.epochs, args.max_steps)
    result = {"routed_top1": accuracy(net, test_loader), "final_loss": loss, "cluster_sizes": sizes,
              "load": [s.memory.load.tolist() for s in rmn.routed_stages(net)]}
    print(f"routed EfficientNet-B0 (N={args.procedures}): {result['routed_top1']:.2f}% test top-1")
    print("samples per procedure:", *result["load"], sep="\n  ")
    return result


if __name__ == "__main__":
    main()
