"""What a weights file is, told by its content (never its extension), and its tensors read without
running code: safetensors through `safetensors`, `torch.save` files through `torch.load(...,
weights_only=True)`, whose unpickler only rebuilds tensors and plain containers. A file that pickles
a whole module is refused with the line that says how to save a state dict instead."""

from __future__ import annotations

import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import IterkdError

# The dictionaries training scripts wrap a state dict in (timm, Lightning, DDP recipes, EMA), and the
# key prefixes wrappers add (DataParallel/DDP, a Lightning module's attribute, torch.compile).
WRAPPERS = ("state_dict", "model", "net", "model_state_dict", "state_dict_ema", "module")
PREFIXES = ("module.", "model.", "_orig_mod.")

SAVE_STATE_DICT = "torch.save(model.state_dict(), 'model.pth')"


def file_kind(path: Path) -> str:
    """'safetensors', 'torch-save' (a torch.save zip or legacy pickle), 'torchscript', 'exported'
    (torch.export.save) or 'unknown', from the first bytes and, for zip archives, their members."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000:
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return "torch-save"  # a zip header with a broken archive: torch.load says what is wrong
        if any(n.endswith("serialized_exported_program.json") or n.endswith("archive_format") for n in names):
            return "exported"
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-save"
        return "unknown"
    if head[:1] == b"\x80":  # a pickle protocol byte: torch.save's legacy (pre-1.6) format
        return "torch-save"
    return "unknown"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or torch.save file, unwrapped from the usual wrapping dictionaries
    and stripped of wrapper key prefixes; IterkdError (one line) for anything else."""
    kind = file_kind(path)
    if kind == "safetensors":
        try:
            obj = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise IterkdError(
                f"teacher {path} is corrupt or not a safetensors file ({str(e).splitlines()[0]})"
            ) from None
    elif kind == "torch-save":
        obj = _torch_load(path)
    elif kind in ("torchscript", "exported"):
        raise IterkdError(
            f"teacher {path} is a {'TorchScript archive' if kind == 'torchscript' else 'torch.export program'}, "
            "not a state dict: it holds code and no VGG iterkd can shrink"
        )
    else:
        raise IterkdError(
            f"teacher {path} is neither a safetensors file nor a torch.save file; save the weights with "
            f"{SAVE_STATE_DICT} or safetensors.torch.save_file"
        )
    return strip_prefixes(unwrap(obj, path))


def _torch_load(path: Path):
    try:
        # A file object, not the path: torch.load picks a reader by the extension of a path (a
        # '.safetensors' name goes to safetensors), and iterkd has already read the content.
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses every global that is not a tensor or a plain container, before
        # anything of it is built: a pickled nn.Module ends here, and none of its code has run.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:  # no class named: a broken pickle stream, not a module
            raise IterkdError(
                f"teacher {path} is a corrupt torch.save file (its pickle stream names no class torch.load "
                "could read: broken or not a torch.save file)"
            ) from None
        raise IterkdError(
            f"teacher {path} pickles Python objects, not only tensors ({found[1]}): "
            f"it looks like torch.save(model); iterkd never unpickles code. Save the weights with {SAVE_STATE_DICT}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, SafetensorError) as e:
        raise IterkdError(
            f"teacher {path} is a corrupt torch.save file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None


def unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside `obj`: `obj` itself when it maps names to tensors, else the first of the
    WRAPPERS keys that holds one (nested wrappers too); other entries (optimizer, epoch) are ignored."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        # A wrapper first: its other entries may be tensors too (a best accuracy, an EMA step count).
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is not None:
            obj = inner
            continue
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and all(isinstance(k, str) for k in tensors):
            return tensors
        break
    keys = ", ".join(map(repr, list(obj)[:6])) if isinstance(obj, Mapping) else type(obj).__name__
    raise IterkdError(
        f"teacher {path} holds no state dict (found {keys}); iterkd reads a mapping of parameter names "
        f"to tensors, also inside one of {', '.join(WRAPPERS)}"
    )


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the wrapper prefixes every key shares ('module.', 'model.', '_orig_mod.', in
    any order and repeated, as DDP around torch.compile writes them)."""
    while True:
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix) :]: v for k, v in state.items()}
    # DataParallel around the features alone (PyTorch's ImageNet example): features.module.0.weight
    return {k.replace("features.module.", "features.", 1): v for k, v in state.items()}
