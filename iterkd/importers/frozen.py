"""Frozen teachers: a model iterkd cannot describe as a VGG spec (a ResNet, a ViT, anything), given as
a `torch.export` program (`.pt2`) or a TorchScript archive. It teaches, and is never shrunk: it is no
node's parent and gives no hint, and a teacher cache keeps only its logits. Neither format is a
pickle of Python objects: an exported program is a serialized graph and weights, a TorchScript
archive TorchScript code run by its own interpreter.

Inputs reach a frozen teacher normalised as the students' are (--normalize); when it was trained on
other statistics (--teacher-normalize), `FrozenTeacher` maps one onto the other on the way in."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import IterkdError
from .files import file_kind

FROZEN_KINDS = {"exported": "torch.export program", "torchscript": "TorchScript archive"}
EXPORT_HOW = (
    "torch.export.save(torch.export.export(model.eval(), (x,), dynamic_shapes=({0: "
    "torch.export.Dim('batch')},)), 'model.pt2')"
)
CHECK_BATCHES = (1, 3)  # the batch sizes a frozen teacher must take (the cache's and training's differ)


def is_frozen_file(path: str | Path) -> bool:
    """True for a file that holds a program rather than weights: a frozen teacher."""
    path = Path(path)
    return path.is_file() and file_kind(path) in FROZEN_KINDS


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FrozenSpec:
    """What iterkd knows of a frozen teacher, in the place a VGG's spec has: its name, format,
    inputs, classes and size, and the file's hash (a teacher cache is keyed by `to_json`)."""

    name: str
    kind: str  # a key of FROZEN_KINDS
    in_channels: int
    input_size: int
    num_classes: int
    n_params: int
    sha256: str
    normalize: str  # the statistics its inputs get (--teacher-normalize), 'students' when theirs

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def params(self) -> int:
        return self.n_params

    def summary(self) -> str:
        return f"{FROZEN_KINDS[self.kind]} {self.name}"


class FrozenTeacher(nn.Module):
    """A frozen model as a teacher: logits only (`forward_features` gives no blocks), inputs mapped
    from the students' normalisation to its own and cropped back to the images' own side (iterkd
    zero-pads 28 px to 32 for its VGGs; the teacher never saw the border), train()/eval() kept off
    the wrapped program (an exported program refuses them: its mode was fixed when it was exported)."""

    def __init__(
        self, module: nn.Module, spec: FrozenSpec, scale=None, shift=None, raw_size: int | None = None
    ):
        super().__init__()
        self.program, self.spec = module, spec
        self.raw = raw_size or spec.input_size
        self.pad = (spec.input_size - self.raw) // 2
        c = spec.in_channels
        self.register_buffer("scale", torch.tensor(scale or [1.0] * c).view(1, c, 1, 1))
        self.register_buffer("shift", torch.tensor(shift or [0.0] * c).view(1, c, 1, 1))
        self.requires_grad_(False)

    def requires_grad_(self, requires_grad: bool = True) -> FrozenTeacher:
        for p in self.parameters():  # a ScriptModule refuses the method, not its parameters
            p.requires_grad_(requires_grad)
        return self

    def train(self, mode: bool = True) -> FrozenTeacher:
        self.training = mode  # the program itself keeps the mode it was exported or scripted in
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = x[..., self.pad : self.pad + self.raw, self.pad : self.pad + self.raw]
        x = x.contiguous()  # the students' batches are channels_last; a program may .view() them
        return self.program(x.float() * self.scale + self.shift if self.spec.normalize != "students" else x)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self(x), []


def renormalization(
    students: tuple[tuple[float, ...], tuple[float, ...]], own: tuple[tuple[float, ...], tuple[float, ...]]
) -> tuple[list[float], list[float]]:
    """(scale, shift) taking an input normalised with `students` (mean, std) to one normalised with
    `own`: x_own = (x * s_students + m_students - m_own) / s_own."""
    (ms, ss), (mo, so) = students, own
    return [s / o for s, o in zip(ss, so)], [(m - n) / o for m, n, o in zip(ms, mo, so)]


def _read_program(path: Path, kind: str, device: torch.device) -> nn.Module:
    try:
        if kind == "exported":
            program = torch.export.load(str(path))
            move = getattr(torch.export.passes, "move_to_device_pass", None) if device.type != "cpu" else None
            # .to() would leave the constants and the devices written into its graph on the CPU
            return (move(program, device) if move else program).module()
        with warnings.catch_warnings():  # deprecated in favour of torch.export, still what many ship
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location=device)
    except Exception as e:  # noqa: BLE001 - any failure to read is the file's; one line says which
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise IterkdError(f"teacher {path} is a corrupt {FROZEN_KINDS[kind]} ({first})") from None


def load_frozen(
    path: str | Path,
    *,
    channels: int,
    size: int,
    classes: int,
    students: tuple[tuple[float, ...], tuple[float, ...]],
    own: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    normalize: str = "students",
    name: str | None = None,
    raw_size: int | None = None,
    device: str | torch.device = "cpu",
) -> FrozenTeacher:
    """The frozen teacher in `path` on `device`, checked on the data's input there: batches of
    CHECK_BATCHES images of `channels` x `raw_size` x `raw_size` (the images' own side; `size` is
    the padded side iterkd's batches have) must give `[batch, classes]` logits. `own` (mean, std)
    are the statistics it was trained with when they are not the students' (`students`);
    `normalize` names them in its spec. One-line IterkdError for anything else."""
    path, device = Path(path), torch.device(device)
    kind = file_kind(path)
    if kind not in FROZEN_KINDS:
        raise IterkdError(f"teacher {path} is not a torch.export program or a TorchScript archive")
    program = _read_program(path, kind, device)
    n_params = sum(p.numel() for p in program.parameters())
    if not all(torch.isfinite(t).all() for t in program.state_dict().values() if t.is_floating_point()):
        raise IterkdError(f"teacher {path} has NaN or infinite weights")
    spec = FrozenSpec(
        name or path.name, kind, channels, size, classes, n_params, file_sha256(path), normalize
    )
    scale, shift = renormalization(students, own) if own is not None else (None, None)
    teacher = FrozenTeacher(program, spec, scale, shift, raw_size).to(device)
    raw = teacher.raw
    for batch in CHECK_BATCHES:
        shape = (batch, channels, raw, raw)
        try:
            with torch.no_grad():  # as training feeds it: padded, channels_last, on the device
                x = torch.zeros(batch, channels, size, size, device=device)
                out = teacher(x.contiguous(memory_format=torch.channels_last))
        except Exception as e:  # noqa: BLE001 - whatever the program raises, in one line
            first = (str(e).splitlines() or [type(e).__name__])[0][:160]
            hint = (
                f"; export it with a dynamic batch dimension: {EXPORT_HOW}"
                if "size()[0]" in first or batch > 1
                else ""
            )
            raise IterkdError(
                f"teacher {path} fails on the data's input {list(shape)} ({first}){hint}"
            ) from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (batch, classes):
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise IterkdError(
                f"teacher {path} gives {got} for a batch of {batch}, but a teacher gives [batch, classes] "
                f"= [{batch}, {classes}] logits for the data's {classes} classes"
            )
        if not torch.isfinite(out).all():
            raise IterkdError(f"teacher {path} gives NaN or infinite logits on the data's input")
    return teacher


def frozen_for_data(
    path: str | Path, info, inputs: tuple, device="cpu", name: str | None = None
) -> FrozenTeacher:
    """`load_frozen` for a dataset (`info`: its channels, sides, classes and the students'
    normalisation) and `inputs`, the teacher's own (SearchConfig.frozen_inputs)."""
    own, how = inputs
    return load_frozen(
        path,
        channels=info.channels,
        size=info.size,
        classes=info.num_classes,
        students=(tuple(info.mean), tuple(info.std)),
        own=own,
        normalize=how,
        name=name,
        raw_size=info.raw_size,
        device=device,
    )
