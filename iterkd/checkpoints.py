"""Checkpoints: safetensors files (no pickle, so loading never runs code) whose metadata carries
the node's architecture spec; written atomically so a crash never leaves a half file that looks good."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .arch import VGGSpec
from .errors import IterkdError
from .models import VGG

FORMAT = "iterkd-checkpoint-1"


def save_checkpoint(path: str | Path, model: VGG, **meta) -> Path:
    """Write model weights + spec to `path` via a temp file and an atomic rename."""
    metadata = {"format": FORMAT, "spec": model.spec.to_json(), **{k: json.dumps(v) for k, v in meta.items()}}
    return write_safetensors(path, model.state_dict(), metadata)


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write tensors (moved to CPU) to `path` via a temp file, fsync and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise IterkdError(
            f"could not write {path}: {e.strerror or e}; free disk space or choose another --run-dir"
        ) from None
    return path


def read_checkpoint(path: str | Path) -> tuple[VGGSpec, dict[str, torch.Tensor], dict]:
    """(spec, state dict, extra metadata) of a checkpoint; a missing, truncated or foreign file, or
    one whose metadata is not a sane spec, raises IterkdError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise IterkdError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            numel = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        spec, extra = _parse_metadata(metadata, path)
        # The spec is only arithmetic so far: refuse one its tensors do not fill before anything is
        # loaded or built, so metadata describing a huge model costs nothing.
        if numel != spec.state_numel():
            raise IterkdError(
                f"checkpoint {path}: weights do not match its spec {spec.summary()} "
                f"({numel} values stored, {spec.state_numel()} expected)"
            )
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise IterkdError(
            f"checkpoint {path} is corrupt or not a safetensors file ({str(e).splitlines()[0]}); "
            "iterkd checkpoints are .safetensors files written by iterkd"
        ) from None
    return spec, state, extra


def _parse_metadata(metadata: dict[str, str], path: Path) -> tuple[VGGSpec, dict]:
    """The spec and the other entries (each JSON) of a checkpoint's metadata, validated."""
    if metadata.get("format") != FORMAT or "spec" not in metadata:
        raise IterkdError(f"checkpoint {path} has no iterkd spec in its metadata; was it written by iterkd?")
    try:
        spec = VGGSpec.from_json(metadata["spec"])
    except IterkdError as e:
        raise IterkdError(
            f"checkpoint {path}: metadata 'spec' is an {e}; was it written by iterkd?"
        ) from None
    extra = {}
    for key, value in metadata.items():
        if key not in ("format", "spec"):
            try:
                extra[key] = json.loads(value)
            except (ValueError, RecursionError):
                raise IterkdError(
                    f"checkpoint {path}: metadata {key!r} is not JSON; was it written by iterkd?"
                ) from None
    return spec, extra


def load_model(path: str | Path) -> VGG:
    """Rebuild the model stored in a checkpoint (eval mode, on CPU)."""
    spec, state, _ = read_checkpoint(path)
    model = VGG(spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise IterkdError(
            f"checkpoint {path}: weights do not match its spec {spec.summary()} ({str(e).splitlines()[0]})"
        ) from None
    return model.eval()
