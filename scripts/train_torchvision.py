"""Train a torchvision classifier on an image folder the way a user would, outside iterkd, and save
it the way users do: the model a user brings to `iterkd search --teacher` (docs/usage.md, "Your own
trained VGG as the root", "Any model as a frozen teacher"; docs/your-model.md). Plain torchvision:
ImageFolder (classes are the sorted folder names, iterkd's order too), standard augmentation, SGD
with a one-cycle schedule, ImageNet normalisation (so the search needs `--normalize imagenet`, or
`--teacher-normalize imagenet` for a frozen teacher).

    python scripts/train_torchvision.py --data-dir fashion-png --arch resnet18 --out resnet18.pt2
    python scripts/train_torchvision.py --data-dir fashion-png --arch vgg11_bn --epochs 9 \\
        --train-images 25000 --lr 0.01 --out vgg11_bn-stage1.pth    # a VGG wants --lr 0.01
    python scripts/train_torchvision.py --data-dir fashion-png --arch vgg11_bn --epochs 2 \\
        --lr 0.003 --init vgg11_bn-stage1.pth --out vgg11_bn.pth    # go on from a state dict

The vgg11_bn lines are the ones docs/your-model.md measured (91.40 % validation).

A `.pth` output is the state dict (`torch.save(model.state_dict(), ...)`); a `.pt2` output is a
`torch.export` program with a dynamic batch dimension, what iterkd takes for a model that is no VGG.

DATA/train/<class>/ is trained on; DATA/val/<class>/, when it exists, is evaluated after every epoch.
Give the folder a val/ split and iterkd validates on the same images, never on ones the root saw.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision import transforms

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def loaders(args) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader | None, int]:
    to_channels = [transforms.Grayscale(num_output_channels=args.channels)]
    norm = transforms.Normalize(IMAGENET_MEAN[: args.channels], IMAGENET_STD[: args.channels])
    size = [transforms.Resize(args.image_size), transforms.CenterCrop(args.image_size)]
    augment = [
        transforms.RandomCrop(args.image_size, padding=args.image_size // 8),
        transforms.RandomHorizontalFlip(),
    ]
    train = torchvision.datasets.ImageFolder(
        Path(args.data_dir) / "train",
        transforms.Compose([*to_channels, *size, *augment, transforms.ToTensor(), norm]),
    )
    if args.train_images and args.train_images < len(train):
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[
            : args.train_images
        ]
        train = torch.utils.data.Subset(train, pick.tolist())
    val_dir = Path(args.data_dir) / "val"
    val = (
        torchvision.datasets.ImageFolder(
            val_dir, transforms.Compose([*to_channels, *size, transforms.ToTensor(), norm])
        )
        if val_dir.is_dir()
        else None
    )
    kw = dict(batch_size=args.batch_size, num_workers=args.workers, persistent_workers=args.workers > 0)
    classes = len(train.dataset.classes if isinstance(train, torch.utils.data.Subset) else train.classes)
    return (
        torch.utils.data.DataLoader(train, shuffle=True, drop_last=True, **kw),
        None if val is None else torch.utils.data.DataLoader(val, **kw),
        classes,
    )


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    hits = total = 0
    for x, y in loader:
        hits += int((model(x.contiguous(memory_format=torch.channels_last)).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * hits / max(total, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--arch", default="vgg11_bn", help="a torchvision classifier: vgg11_bn, resnet18, ...")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3, choices=(1, 3))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-images", type=int, default=0, help="a seeded subset of train/ (0: all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes (decoding)")
    p.add_argument("--out", type=Path, default=Path("vgg.pth"))
    p.add_argument(
        "--init",
        type=Path,
        help="a state dict (.pth) of the same architecture to go on training from (read weights_only)",
    )
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train, val, classes = loaders(args)
    model = getattr(torchvision.models, args.arch)(weights=None, num_classes=classes)
    if args.init is not None:
        model.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * len(train))
    loss_fn = nn.CrossEntropyLoss()
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        seen, epoch_start = 0, time.time()
        for x, y in train:
            loss = loss_fn(model(x.contiguous(memory_format=torch.channels_last)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
        line = {
            "epoch": epoch + 1,
            "loss": round(loss.item(), 4),
            "train_images_per_s": round(seen / (time.time() - epoch_start), 1),
            "seconds": round(time.time() - start, 1),
        }
        if val is not None:
            line["val_acc"] = round(accuracy(model, val), 2)
        print(json.dumps(line), flush=True)
        if args.out.suffix != ".pt2":
            # The way users save: the state dict, not the module (iterkd never unpickles a module);
            # after every epoch, so a killed run keeps its work.
            torch.save(model.state_dict(), args.out)
    if args.out.suffix == ".pt2":
        # A model that is no VGG: its program, exported with a dynamic batch dimension.
        model = model.eval().to(memory_format=torch.contiguous_format)
        x = torch.randn(2, args.channels, args.image_size, args.image_size)
        batch = torch.export.Dim("batch")
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), str(args.out))
    elif not args.epochs:
        torch.save(model.state_dict(), args.out)  # no epoch ran: the initial weights
    print(json.dumps({"saved": str(args.out), "arch": args.arch, "classes": classes}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
