"""`iterkd.compress`: the search from Python, for a trained `nn.Module` and map-style datasets.

The datasets are written once into the memory-mapped store (`iterkd.data.python`); the module is
written into the run directory the way a user would give it to the CLI: a VGG as its state dict
(`RUN/model/model.safetensors`, imported and shrunk) once the VGG read from it reproduces the
module's own logits; anything else as a `torch.export` program (`RUN/model/model.pt2`, a frozen
teacher). Then it is the same search as `iterkd search --dataset store --data-dir KEY --teacher
FILE`, with the same run directory, report and resume."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .config import build_config, resume_config
from .data import STORED, python_store
from .errors import IterkdError
from .importers import import_vgg
from .importers.frozen import EXPORT_HOW
from .importers.vgg import TOLERANCE
from .run import read_config
from .search import Search, SearchOutcome


def compress(
    model: nn.Module,
    train,
    val=None,
    test=None,
    *,
    max_drop: float = 1.0,
    space: str = "vgg16_blocks",
    preset: str = "quick",
    run_dir: str | Path = "runs/compress",
    classes=None,
    progress: bool = True,
    log=print,
    **settings,
) -> SearchOutcome:
    """Compress `model` on `train` (validation: `val`, else a stratified share of `train`; test
    accuracy on `test` when given) into the smallest VGG of `space` within `max_drop` points; any
    other search setting by its SearchConfig name (`epochs=4`, `variant="ancestors-child"`,
    `normalize="imagenet"`, ...). Calling it again with the same arguments resumes the run. Returns
    the SearchOutcome, its `model` the final model (eval mode, CPU)."""
    run_dir = Path(run_dir)
    store = python_store(train, val, test, classes=classes, progress=progress, log=log)
    info = store.info()
    values = dict(
        name=settings.pop("name", run_dir.name),
        run_dir=str(run_dir),
        dataset=STORED,
        data_dir=store.key,
        max_drop=max_drop,
        space=space,
        **settings,
    )
    raw = info.raw_size or info.size
    values["teacher"] = (str(write_model(model, run_dir / "model", info.channels, info.size, raw, log)),)
    saved = read_config(run_dir)
    cfg = (
        build_config(preset, values) if saved is None else resume_config(saved, {**values, "preset": preset})
    )
    outcome = Search(cfg, progress=progress, log=log).run()
    from .export import load as load_node

    return replace(outcome, model=load_node(run_dir / outcome.final.checkpoint))


def write_model(model: nn.Module, folder: Path, channels: int, size: int, raw: int, log=print) -> Path:
    """`model` as the file `--teacher` reads: a VGG's state dict when the VGG iterkd reads from it
    gives the module's own logits (on `size` px, the padded side its VGG runs on), else a
    torch.export program with a dynamic batch dimension on the images' own `raw` side."""
    if not isinstance(model, nn.Module):
        raise IterkdError(f"iterkd.compress takes a torch.nn.Module, got {type(model).__name__}")
    module = copy.deepcopy(model).cpu().eval()
    folder.mkdir(parents=True, exist_ok=True)
    x = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    why = _vgg_mismatch(module, state, x, size)
    if why is None:
        path = folder / "model.safetensors"
        save_file(state, str(path))
        return path
    log(f"iterkd.compress: the model is no VGG iterkd can shrink ({why}); it teaches as a frozen teacher")
    path = folder / "model.pt2"
    try:
        # By position, whatever its forward's argument is called.
        shape = x[..., :raw, :raw].contiguous()
        program = torch.export.export(module, (shape,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as e:  # noqa: BLE001 - torch.export's reasons are many; one line names it
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise IterkdError(
            f"iterkd.compress: the model is no VGG and torch.export cannot export it ({first}); export it "
            f"yourself ({EXPORT_HOW}) and pass the file to iterkd search --teacher"
        ) from None
    torch.export.save(program, str(path))
    return path


def _vgg_mismatch(module: nn.Module, state: dict, x: torch.Tensor, size: int) -> str | None:
    """None when `state` imports as a VGG that reproduces `module` on `x`; else why not, in words."""
    try:
        imported = import_vgg(state, size=size, path=Path("the model"))
    except IterkdError as e:
        return str(e).removeprefix("teacher the model: ").removeprefix("teacher the model ")
    with torch.no_grad():
        want = module(x)
        got = imported.model.eval()(x)
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return "its output is not the logits of the VGG its weights describe"
    diff = float((want - got).abs().max())
    limit = TOLERANCE * max(1.0, float(want.abs().max()))
    if not diff <= limit:
        return f"the VGG its weights describe differs from its own logits by {diff:.2g} > {limit:.2g}"
    return None
