"""A trained VGG's state dict as an iterkd spec and model, checked by comparing logits.

The layout is read from the keys and shapes alone: a `features` stack of 3x3 convs (each followed
by batch norm or not), ReLUs and 2x2 max-pools, then a classifier of one or more linear layers (ReLU
and dropout between them), with or without average pooling before it. Parameter-free layers leave no
key, so the pools come from the gaps in the `features.N` numbering: conv, BN, ReLU take three
indices, a max-pool one more. The channels come from the first conv, the classes from the last
linear layer, the pooled grid from the first linear layer's inputs over the last conv's channels; the
input size is the data's.

Nothing is assumed right: the iterkd model is compared with a reference built independently from the
same file, torchvision's own constructor when the layout is one of torchvision's eight VGGs, else
the module the keys describe, rebuilt layer by layer under the file's own key names. Their logits on
the same inputs must agree within `TOLERANCE`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..arch import MAX_PARAMS, VGG_PRESETS, VGGSpec
from ..errors import IterkdError
from ..models import VGG

# Max abs difference of logits, eval mode, for logits up to 1 in size; larger logits are allowed the
# same relative difference (fp32 sums in another order differ by ~1e-7 of the values summed: a
# barely trained VGG with logits in the thousands differs by ~1e-3 from its own reference).
TOLERANCE = 1e-4
CLASSIFIERS = ("classifier", "fc", "linear", "head")  # what CIFAR-style VGGs call their last layers
TORCHVISION_HIDDEN = (4096, 4096)
TORCHVISION_GRID = 7
CUSTOM = "custom"  # torchvision's VGG class with conv widths of its own


@dataclass(frozen=True)
class Imported:
    model: VGG  # eval mode, CPU
    layout: str  # "torchvision vgg11_bn" or "CIFAR-style VGG"
    reference: str  # what its logits were compared with
    max_diff: float
    limit: float  # TOLERANCE x max(1, largest logit)


@dataclass(frozen=True)
class _Layer:
    prefix: str  # the key prefix, e.g. "features.3"
    index: int
    kind: str  # conv, bn, linear


def import_vgg(state: dict[str, torch.Tensor], *, size: int, path: Path, arch: str | None = None) -> Imported:
    """The iterkd VGG holding `state`'s weights for `size` x `size` inputs; IterkdError (one line)
    when the file is not a VGG iterkd can describe, or the VGG does not reproduce it. `arch` (a
    torchvision VGG name, --teacher-arch) gives the blocks instead of the gaps between conv keys."""
    _check_values(state, path)
    features, classifier = _layers(state, path)
    spec = _spec(state, features, classifier, size, path, arch)
    model = _load(spec, state, features, classifier, path)
    name = torchvision_name(spec, classifier)
    try:
        reference = (
            _torchvision_reference(name, state, spec) if name else _rebuilt(state, features, classifier, spec)
        )
    except RuntimeError as e:  # the keys do not fit the module they seemed to describe
        raise IterkdError(
            f"teacher {path}: its own model cannot be rebuilt from its keys to check the import "
            f"({str(e).splitlines()[0]}); its layout is not one iterkd can describe"
        ) from None
    diff, scale = logits_difference(model, reference, spec, path)
    limit = TOLERANCE * max(1.0, scale)
    if diff > limit:
        raise IterkdError(
            f"teacher {path}: the VGG read from it does not reproduce the file's own model (logits differ by "
            f"up to {diff:.2g}, more than {limit:.2g}); its layout is not one iterkd can describe"
        )
    if name == CUSTOM:
        layout, what = "torchvision VGG (own conv widths)", "torchvision.models.vgg.VGG on its widths"
    elif name:
        layout, what = f"torchvision {name}", f"torchvision.models.{name}"
    else:
        layout, what = "CIFAR-style VGG", "the module its keys describe"
    return Imported(model, layout, what, diff, limit)


def _check_values(state: dict[str, torch.Tensor], path: Path) -> None:
    numel = sum(t.numel() for t in state.values())
    if numel > MAX_PARAMS:
        raise IterkdError(
            f"teacher {path} holds {numel:,} values, more than the {MAX_PARAMS:.0e} iterkd builds"
        )
    for key, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise IterkdError(f"teacher {path}: {key} holds NaN or infinite values; the model is broken")


def _layers(state, path: Path) -> tuple[list[_Layer], list[_Layer]]:
    """The parametrised layers of `features` and of the classifier, in order."""
    by_prefix: dict[str, set[str]] = {}
    for key in state:
        prefix, _, param = key.rpartition(".")
        by_prefix.setdefault(prefix, set()).add(param)
    features, classifier, misfits = [], [], []
    for prefix, params in by_prefix.items():
        head, _, index = prefix.rpartition(".")
        weight = state.get(f"{prefix}.weight")
        if weight is None:
            misfits.append(prefix)
            continue
        if head == "features" and index.isdigit():
            if weight.dim() == 4:
                features.append(_Layer(prefix, int(index), "conv"))
            elif weight.dim() == 1 and "running_mean" in params:
                features.append(_Layer(prefix, int(index), "bn"))
            else:
                misfits.append(prefix)
        elif (head in CLASSIFIERS and index.isdigit()) or (not head and index in CLASSIFIERS):
            if weight.dim() == 2:
                classifier.append(_Layer(prefix, int(index) if index.isdigit() else 0, "linear"))
            else:
                misfits.append(prefix)  # e.g. a BatchNorm1d between linear layers: not a VGG head
        else:
            misfits.append(prefix)
    if misfits or not features or not classifier:
        first = (
            sorted(misfits)[:4]
            if misfits
            else (["no features.N convs"] if not features else ["no classifier"])
        )
        raise IterkdError(
            f"teacher {path}: not a VGG layout iterkd recognises: {', '.join(first)} did not fit (expected "
            "features.N convs with optional batch norm, then classifier/fc linear layers)"
        )
    if len({c.prefix.rpartition(".")[0] for c in classifier}) > 1:
        raise IterkdError(
            f"teacher {path}: linear layers in several places ({', '.join(c.prefix for c in classifier)})"
        )
    return sorted(features, key=lambda c: c.index), sorted(classifier, key=lambda c: c.index)


def _spec(
    state, features: list[_Layer], classifier: list[_Layer], size: int, path: Path, arch: str | None = None
) -> VGGSpec:
    convs = [c for c in features if c.kind == "conv"]
    bns = [c for c in features if c.kind == "bn"]
    batch_norm = bool(bns)
    for conv in convs:
        w = state[f"{conv.prefix}.weight"]
        if tuple(w.shape[2:]) != (3, 3):
            raise IterkdError(
                f"teacher {path}: {conv.prefix} is a {w.shape[2]}x{w.shape[3]} conv; iterkd's VGGs use 3x3"
            )
    if not convs:
        raise IterkdError(f"teacher {path}: not a VGG layout iterkd recognises: features has no conv")
    if batch_norm:
        expected = [_Layer(f"features.{c.index + 1}", c.index + 1, "bn") for c in convs]
        if bns != expected:
            pairs = zip([*bns, *[None] * len(convs)], expected)
            # the first mismatch; when every conv has its BN, the extra BN after them
            odd = next((b.prefix if b is not None else e.prefix for b, e in pairs if b != e), bns[-1].prefix)
            raise IterkdError(
                f"teacher {path}: batch norm must follow every conv or none ({odd} does not fit)"
            )
    step = 3 if batch_norm else 2  # conv (+ BN) + ReLU
    blocks, block, c_in = [], [], state[f"{convs[0].prefix}.weight"].shape[1]
    channels = c_in
    for prev, conv in zip([None, *convs], convs):
        w = state[f"{conv.prefix}.weight"]
        if w.shape[1] != channels:
            raise IterkdError(
                f"teacher {path}: weight shapes contradict each other: {conv.prefix} reads {w.shape[1]} "
                f"channels, the layer before it gives {channels}"
            )
        if prev is not None:
            gap = conv.index - prev.index
            if gap == step + 1:  # a max-pool between them: a new block
                blocks.append(tuple(block))
                block = []
            elif gap != step and arch is None:
                raise IterkdError(
                    f"teacher {path}: not a VGG layout iterkd recognises: {prev.prefix} and {conv.prefix} are "
                    f"{gap} layers apart (conv{', BN' if batch_norm else ''}, ReLU and at most a max-pool between convs)"
                )
        block.append(int(w.shape[0]))
        if batch_norm:
            bn = state[f"features.{conv.index + 1}.weight"]
            if bn.shape[0] != w.shape[0]:
                raise IterkdError(
                    f"teacher {path}: weight shapes contradict each other: features.{conv.index + 1} normalises "
                    f"{bn.shape[0]} channels, {conv.prefix} gives {w.shape[0]}"
                )
        channels = int(w.shape[0])
    blocks.append(tuple(block))
    if arch is not None:
        named = VGG_PRESETS[arch.removesuffix("_bn")]
        if [w for b in named for w in b] != [w for b in blocks for w in b] or arch.endswith(
            "_bn"
        ) != batch_norm:
            raise IterkdError(
                f"teacher {path} is not a {arch} (--teacher-arch): its convs are "
                f"{[w for b in blocks for w in b]}{' with' if batch_norm else ' without'} batch norm"
            )
        blocks = list(named)
    widths = [tuple(state[f"{c.prefix}.weight"].shape) for c in classifier]
    for (prev, cur), layer in zip(zip(widths, widths[1:]), classifier[1:]):
        if cur[1] != prev[0]:
            raise IterkdError(
                f"teacher {path}: weight shapes contradict each other: {layer.prefix} takes {cur[1]} inputs, "
                f"the layer before it gives {prev[0]}"
            )
    first_in = widths[0][1]
    grid = math.isqrt(first_in // channels) if first_in % channels == 0 else 0
    if grid < 1 or grid * grid * channels != first_in:
        raise IterkdError(
            f"teacher {path}: weight shapes contradict each other: {classifier[0].prefix} takes {first_in} inputs, "
            f"not the {channels} channels of the last conv on a square grid"
        )
    spec = VGGSpec(
        tuple(blocks),
        in_channels=int(c_in),
        num_classes=int(widths[-1][0]),
        input_size=size,
        batch_norm=batch_norm,
        grid=grid,
        hidden=tuple(int(w[0]) for w in widths[:-1]),
    )
    # The keys cannot show a max-pool after the last conv: iterkd assumes one (every VGG configuration
    # ends with one). A grid other than 1 or the map's own side would mean pooling a map up, which
    # only torchvision's layout does (checked against torchvision itself); elsewhere it rather means
    # a last block without its pool, read whole: a model iterkd cannot describe.
    if grid not in (1, spec.map_size) and torchvision_name(spec, classifier) is None:
        raise IterkdError(
            f"teacher {path}: {classifier[0].prefix} reads a {grid}x{grid} map, but after a max-pool closing "
            f"the last block the map is {spec.map_size}x{spec.map_size}; iterkd's VGGs end every block with "
            "a max-pool (while the map is larger than 1x1) and this model seems not to"
        )
    return spec


def _load(spec: VGGSpec, state, features: list[_Layer], classifier: list[_Layer], path: Path) -> VGG:
    """The iterkd VGG of `spec` holding the file's tensors, layer by layer in order (shapes already
    agree). Built on the meta device and given the tensors as they are: a 130 M-parameter head costs
    no initialisation that would be overwritten."""
    with torch.device("meta"):
        model = VGG(spec)
    mine = [
        f"blocks.{b}.{i}"
        for b, block in enumerate(model.blocks)
        for i, m in enumerate(block)
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))
    ]
    hidden = (
        [f"hidden.{i}" for i, m in enumerate(model.hidden) if isinstance(m, nn.Linear)] if spec.hidden else []
    )
    mapped = {}
    for target, layer in [*zip(mine, features), *zip([*hidden, "head"], classifier)]:
        module = model.get_submodule(target)
        for name, tensor in module.state_dict().items():
            source = state.get(f"{layer.prefix}.{name}")
            if source is None and name == "bias":  # a layer without bias: iterkd's adds a zero one
                source = torch.zeros(tensor.shape)
            elif source is None and name == "num_batches_tracked":
                source = torch.zeros((), dtype=torch.long)
            elif source is None:
                raise IterkdError(f"teacher {path}: {layer.prefix}.{name} is missing")
            mapped[f"{target}.{name}"] = source.to(tensor.dtype).reshape(tensor.shape).contiguous()
    model.load_state_dict(mapped, strict=True, assign=True)
    return model.eval()


def torchvision_name(spec: VGGSpec, classifier: list[_Layer]) -> str | None:
    """Which of torchvision's eight VGGs has this spec and classifier layout; CUSTOM for its VGG class
    on other conv widths (torchvision.models.vgg.VGG(make_layers(cfg))); None when not torchvision's."""
    if (spec.grid, spec.hidden, [c.prefix for c in classifier]) != (
        TORCHVISION_GRID,
        TORCHVISION_HIDDEN,
        ["classifier.0", "classifier.3", "classifier.6"],
    ):
        return None
    name = next((n for n, blocks in VGG_PRESETS.items() if blocks == spec.blocks), CUSTOM)
    return name if name == CUSTOM else name + ("_bn" if spec.batch_norm else "")


def _torchvision_reference(name: str, state, spec: VGGSpec) -> nn.Module:
    import torchvision  # only here: importing iterkd stays as light as it is

    with torch.device("meta"):  # no initialisation: every weight comes from the file
        if name == CUSTOM:  # torchvision's class on the file's widths, a max-pool after every block
            cfg = [v for block in spec.blocks for v in (*block, "M")]
            features = torchvision.models.vgg.make_layers(cfg, batch_norm=spec.batch_norm)
            model = torchvision.models.vgg.VGG(features, num_classes=spec.num_classes, init_weights=False)
            # the class reads 512 channels; a user's last conv may have others (its pooling is the class's)
            model.classifier[0] = nn.Linear(spec.head_in, TORCHVISION_HIDDEN[0])
        else:
            model = getattr(torchvision.models, name)(weights=None, num_classes=spec.num_classes)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


class _Rebuilt(nn.Module):
    """The module a CIFAR-style VGG's keys describe: features (convs, BN, ReLU and max-pools at the
    file's own indices), pooling to the grid the classifier reads, then the classifier."""

    def __init__(self, features: nn.Sequential, grid: int, classifier: nn.Module, name: str):
        super().__init__()
        self.features, self.grid = features, grid
        setattr(self, name, classifier)
        self.classifier_name = name

    def forward(self, x):
        x = self.features(x)
        if x.shape[-1] != self.grid:
            x = nn.functional.adaptive_avg_pool2d(x, self.grid)
        return getattr(self, self.classifier_name)(torch.flatten(x, 1))


def _rebuilt(state, features: list[_Layer], classifier: list[_Layer], spec: VGGSpec) -> nn.Module:
    layers: dict[int, nn.Module] = {}
    sizes = iter(spec.block_sizes())
    blocks = iter(spec.blocks)
    convs = [c for c in features if c.kind == "conv"]
    step = 3 if spec.batch_norm else 2
    size, left = next(sizes), len(next(blocks))
    for conv in convs:
        w = state[f"{conv.prefix}.weight"]
        layers[conv.index] = nn.Conv2d(
            w.shape[1], w.shape[0], 3, padding=1, bias=f"{conv.prefix}.bias" in state
        )
        if spec.batch_norm:
            layers[conv.index + 1] = nn.BatchNorm2d(w.shape[0])
        layers[conv.index + step - 1] = nn.ReLU()
        left -= 1
        if left == 0:
            if size > 1:
                layers[conv.index + step] = nn.MaxPool2d(2)
            nxt = next(blocks, None)
            if nxt is not None:
                size, left = next(sizes), len(nxt)
    seq = nn.Sequential(*(layers.get(i, nn.Identity()) for i in range(max(layers) + 1)))
    head_name = classifier[0].prefix.rpartition(".")[0] or classifier[0].prefix
    if len(classifier) == 1 and "." not in classifier[0].prefix:
        w = state[f"{head_name}.weight"]
        head: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=f"{head_name}.bias" in state)
    else:
        mods: dict[int, nn.Module] = {}
        for i, c in enumerate(classifier):
            w = state[f"{c.prefix}.weight"]
            mods[c.index] = nn.Linear(w.shape[1], w.shape[0], bias=f"{c.prefix}.bias" in state)
            if i < len(classifier) - 1:
                mods[c.index + 1] = nn.ReLU()
        head = nn.Sequential(*(mods.get(i, nn.Identity()) for i in range(max(mods) + 1)))
    model = _Rebuilt(seq, spec.grid, head, head_name)
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def logits_difference(
    model: nn.Module, reference: nn.Module, spec: VGGSpec, path: Path, batch: int = 4
) -> tuple[float, float]:
    """(max abs difference of the two models' logits, largest abs logit of the reference) on `batch`
    seeded random inputs of the spec's shape."""
    x = torch.randn(
        batch, spec.in_channels, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(0)
    )
    try:
        theirs = reference(x)
    except RuntimeError as e:
        raise IterkdError(
            f"teacher {path} does not run on {spec.input_size}x{spec.input_size} inputs ({str(e).splitlines()[0]}); "
            "set --image-size to the size it was trained on"
        ) from None
    return float((model(x) - theirs).abs().max()), float(theirs.abs().max())
