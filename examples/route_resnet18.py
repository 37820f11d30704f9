"""Route a torchvision ResNet-18 with rmn inside a plain PyTorch training loop: the paper's four steps.

    pip install 'rmn[digits]' torchvision
    python examples/route_resnet18.py                # about 10 minutes on 2 CPU cores
    python examples/route_resnet18.py --pretrained   # start from torchvision's ImageNet weights (downloads them)

Step 1 trains the plain network with Conditional Attention inserted (``clone=False``: one procedure per stage,
attention fed random routes); step 2 clones every stage into N procedures and the optimizer's momentum with
them; step 3 sets the memories by k-means on each stage's GAP'd inputs; step 4 trains routed, the memories
following the features routed to them. The caller's ``model`` is never modified: rmn.route returns copies.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rmn  # noqa: E402
from loop import accuracy, loaders, options, train  # noqa: E402

STAGES = ["layer1", "layer2", "layer3", "layer4"]  # torchvision's (and timm's) ResNet stage names


def build(pretrained: bool, num_classes: int) -> torch.nn.Module:
    if not pretrained:
        return torchvision.models.resnet18(num_classes=num_classes)
    model = torchvision.models.resnet18(weights="DEFAULT")
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    return model


def main(argv: list[str] | None = None) -> dict:
    args = options(__doc__, procedures=8, lr=0.05, argv=argv)
    torch.manual_seed(0)
    train_loader, feature_loader, test_loader = loaders(args.image_size, args.batch_size)
    model = build(args.pretrained, num_classes=10)

    # step 1: the plain network with Conditional Attention (random init from scratch, near-identity on a trained model)
    plain = rmn.route(model, STAGES, args.procedures, attention="ca", clone=False,
                      attention_init="identity" if args.pretrained else "random")
    opt = torch.optim.SGD(plain.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-5)
    train(plain, opt, train_loader, args.epochs, args.max_steps)
    plain_top1 = accuracy(plain, test_loader)

    net = rmn.route(plain)                                  # step 2: N procedures per stage ...
    opt = rmn.clone_optimizer(opt, plain, net)              # ... each with its source's momentum
    sizes = rmn.init_memories(net, feature_loader).cluster_sizes  # step 3: k-means memories
    loss = train(net, opt, train_loader, args.epochs, args.max_steps)  # step 4: routed training
    result = {"plain_top1": plain_top1, "routed_top1": accuracy(net, test_loader), "final_loss": loss,
              "cluster_sizes": sizes, "load": [s.memory.load.tolist() for s in rmn.routed_stages(net)]}
    print(f"plain network: {plain_top1:.2f}% | routed (N={args.procedures}): {result['routed_top1']:.2f}% test top-1")
    print("samples per procedure in step 4:", *result["load"], sep="\n  ")
    return result


if __name__ == "__main__":
    main()
