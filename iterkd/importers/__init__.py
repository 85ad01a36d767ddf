"""Models from outside: a `--teacher` file becomes the root's model. iterkd's own checkpoints load as
they are; the state dict of a trained VGG (torchvision's eight, or a CIFAR-style layout), in a
safetensors or torch.save file, is read into an iterkd spec and checked by comparing logits
(`vgg`). Files are told apart by content and read without running code (`files`). Any other model,
as a torch.export program or TorchScript archive, is a frozen teacher (`frozen`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..arch import VGGSpec
from ..checkpoints import FORMAT, load_model
from ..data import DatasetInfo
from ..errors import IterkdError
from ..models import VGG
from .files import file_kind, read_state_dict
from .frozen import FrozenSpec, FrozenTeacher, file_sha256, is_frozen_file, load_frozen
from .vgg import TOLERANCE, Imported, import_vgg

__all__ = [
    "TOLERANCE",
    "FrozenSpec",
    "FrozenTeacher",
    "Imported",
    "Teacher",
    "check_input",
    "file_kind",
    "file_sha256",
    "is_frozen_file",
    "load_frozen",
    "import_vgg",
    "load_teacher",
    "read_state_dict",
]


@dataclass(frozen=True)
class Teacher:
    model: VGG  # eval mode, CPU
    imported: Imported | None  # how a foreign file was read; None for an iterkd checkpoint

    def describe(self, path: Path) -> str:
        """One line: what the file was read as, and how closely its logits were reproduced."""
        spec = self.model.spec
        if self.imported is None:
            return f"{path.name}: iterkd checkpoint, {spec.summary()}, {spec.params():,} params"
        i = self.imported
        return (
            f"{path.name}: imported as a {i.layout}, {spec.summary()}, {spec.params():,} params; its logits "
            f"match {i.reference} to {i.max_diff:.1e} (limit {i.limit:.1e})"
        )


def is_iterkd_checkpoint(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError, ValueError):
        return False


def check_input(spec: VGGSpec, info: DatasetInfo, path: Path) -> None:
    """A one-line error unless the model takes the data's channels and size and has its classes."""
    theirs = (spec.in_channels, spec.input_size, spec.num_classes)
    ours = (info.channels, info.size, info.num_classes)
    if theirs != ours:
        raise IterkdError(
            f"teacher {path} takes {theirs[0]}-channel {theirs[1]}px input with {theirs[2]} classes, but "
            f"{info.name} has {ours[0]} channels, {ours[1]}px, {ours[2]} classes"
            + ("; set --channels to the model's" if theirs[0] != ours[0] else "")
        )


def load_teacher(path: str | Path, *, size: int, arch: str | None = None) -> Teacher:
    """The model in `path` for `size` x `size` inputs: an iterkd checkpoint, or an imported VGG
    (`arch`: --teacher-arch, the torchvision VGG it is)."""
    path = Path(path)
    if not path.is_file():
        raise IterkdError(f"teacher {path} does not exist")
    if file_kind(path) == "safetensors" and is_iterkd_checkpoint(path):
        return Teacher(load_model(path), None)
    imported = import_vgg(read_state_dict(path), size=size, path=path, arch=arch)
    return Teacher(imported.model, imported)
