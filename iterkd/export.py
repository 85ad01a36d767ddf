"""Ship a node: write its model as ONNX / TorchScript / safetensors with its spec and a model card,
verify every written file against the PyTorch model on real validation images, and load it back."""

from __future__ import annotations

import json
import shlex
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoints import load_model
from .config import SearchConfig, search_command
from .data import DatasetInfo, dataset_info, load_data, normalize
from .deploy import example_input, onnx_session, write_onnx
from .errors import IterkdError
from .lineage import Node, ancestry
from .models import VGG
from .run import Run
from .storage import redact_url

FORMATS = ("onnx", "torchscript", "safetensors")
FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "safetensors": "model.safetensors"}
MAX_ABS_DIFF = 1e-4  # fp32 logits of an exported file vs the PyTorch model; more is an error
VERIFY_IMAGES = 64
EXPORT_FORMAT = "iterkd-export-1"
RAW_SIZE = {
    "fashion-mnist": 28,
    "mnist": 28,
}  # torchvision's image side; data.load_data zero-pads to info.size


# -- writers ----------------------------------------------------------------------------------


def write_torchscript(model: VGG, path: str | Path) -> Path:
    path = Path(path)
    with warnings.catch_warnings():
        # torch >= 2.9 marks TorchScript deprecated; the format is still what many C++/mobile runtimes load.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        traced = torch.jit.trace(model.eval(), example_input(model.spec, 2))
        traced.save(str(path))
    return path


def write_safetensors(run: Run, n: Node, path: str | Path) -> Path:
    """The node's own checkpoint, byte for byte: weights + spec in the metadata, no code."""
    path = Path(path)
    path.write_bytes((run.run_dir / n.checkpoint).read_bytes())
    return path


# -- loading ----------------------------------------------------------------------------------


def load(path: str | Path) -> torch.nn.Module:
    """A model ready for inference on the CPU, in eval mode, from
    - an iterkd checkpoint or an exported model.safetensors: weights only (safetensors never runs code),
      rebuilt from the spec in its metadata as an iterkd VGG;
    - an export directory: its model.safetensors, else its TorchScript file;
    - a TorchScript file (.pt): torch.jit.load; it carries TorchScript code, so load only files you trust.
    ONNX files are run with onnxruntime.InferenceSession, not loaded as a torch module."""
    p = Path(path)
    if p.is_dir():
        for name in (FILES["safetensors"], FILES["torchscript"]):
            if (p / name).is_file():
                return load(p / name)
        raise IterkdError(
            f"{p} holds neither {FILES['safetensors']} nor {FILES['torchscript']}; "
            "pass an iterkd export directory or checkpoint"
        )
    if p.suffix == ".onnx":
        raise IterkdError(
            f"{p} is an ONNX file: run it with onnxruntime.InferenceSession; iterkd.load "
            "takes a .safetensors checkpoint, a TorchScript .pt file or an export directory"
        )
    if p.suffix == ".pt":
        if not p.is_file():
            raise IterkdError(f"TorchScript file {p} does not exist")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
                return torch.jit.load(str(p), map_location="cpu").eval()
        except (RuntimeError, ValueError) as e:
            raise IterkdError(f"{p} is not a TorchScript file ({str(e).splitlines()[0][:200]})") from None
    return load_model(p)


@torch.inference_mode()
def run_exported(fmt: str, path: Path, x: torch.Tensor) -> torch.Tensor:
    """Logits of an exported file on the batch x, through the runtime a deployment would use."""
    if fmt == "onnx":
        return torch.from_numpy(onnx_session(path).run(None, {"input": x.numpy()})[0])
    return load(path)(x)


# -- verification -----------------------------------------------------------------------------


def validation_batch(
    cfg: SearchConfig, data_dir: str | None = None, size: int = VERIFY_IMAGES
) -> torch.Tensor:
    """The first `size` images of the run's own validation split, normalised as in training."""
    data = load_data(
        cfg.dataset, data_dir or cfg.data_dir, val_size=cfg.val_size, seed=cfg.seed, download=cfg.download
    )
    return normalize(data.val_x[:size], data.info)


@torch.inference_mode()
def verify(
    model: VGG, files: dict[str, Path], x: torch.Tensor, tol: float = MAX_ABS_DIFF
) -> dict[str, float]:
    """Max abs difference of each exported file's logits from the PyTorch model's on x; any above
    `tol` (or NaN) raises IterkdError: a file that computes something else must not ship."""
    expected = model.eval()(x)
    diffs = {fmt: (run_exported(fmt, path, x) - expected).abs().max().item() for fmt, path in files.items()}
    bad = [f"{files[f].name} differs by {d:.3g}" for f, d in diffs.items() if not d <= tol]
    if bad:
        raise IterkdError(
            f"verification failed: {'; '.join(bad)} (max abs logit diff allowed {tol:g} on "
            f"{len(x)} validation images); do not ship the files in {next(iter(files.values())).parent}"
        )
    return diffs


# -- the export -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    node: int
    out_dir: Path
    files: dict[str, Path]
    max_abs_diff: dict[str, float]
    card: Path


def parse_formats(text: str) -> tuple[str, ...]:
    if text == "all":
        return FORMATS
    if text not in FORMATS:
        raise IterkdError(f"unknown --format {text!r}; choose one of {', '.join(FORMATS)} or all")
    return (text,)


def export_node(
    run: Run,
    n: Node,
    formats=FORMATS,
    out_dir: str | Path | None = None,
    *,
    data_dir: str | None = None,
    command: str | None = None,
    bench_md: str = "",
) -> ExportResult:
    """Write node n in `formats` to out_dir (default RUN/export/node-N), verify every file on the
    run's validation images, then write spec.json and MODEL_CARD.md (only once verified)."""
    out = Path(out_dir) if out_dir else run.run_dir / "export" / f"node-{n.node}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IterkdError(f"cannot create output directory {out} ({e.strerror})") from None
    for stale in ("spec.json", "MODEL_CARD.md"):  # a card must never vouch for files this run did not verify
        (out / stale).unlink(missing_ok=True)
    model = run.model(n)
    writers = {
        "onnx": lambda p: write_onnx(model, p),
        "torchscript": lambda p: write_torchscript(model, p),
        "safetensors": lambda p: write_safetensors(run, n, p),
    }
    files = {fmt: writers[fmt](out / FILES[fmt]) for fmt in formats}
    x = validation_batch(run.cfg, data_dir)
    diffs = verify(run.model(n), files, x)  # a fresh copy: a writer that altered `model` cannot hide it
    info = dataset_info(run.cfg.dataset)
    spec_doc = {
        "format": EXPORT_FORMAT,
        "run": run.cfg.name,
        "node": n.node,
        "architecture": asdict(n.spec),
        "input": input_contract(info, n.spec),
        "classes": class_names(info),
        "files": {f: p.name for f, p in files.items()},
        "verification": {"images": len(x), "max_abs_diff": diffs, "tolerance": MAX_ABS_DIFF},
        "val_acc": n.val_acc,
        "test_acc": n.test_acc,
    }
    (out / "spec.json").write_text(json.dumps(spec_doc, indent=2) + "\n")
    card = out / "MODEL_CARD.md"
    card.write_text(model_card(run, n, files, diffs, len(x), command, bench_md))
    return ExportResult(n.node, out, files, diffs, card)


def input_contract(info: DatasetInfo, spec) -> dict:
    return {
        "name": "input",
        "shape": ["batch", spec.in_channels, spec.input_size, spec.input_size],
        "dtype": "float32",
        "layout": "NCHW",
        "scale": "pixel / 255",
        "mean": list(info.mean),
        "std": list(info.std),
        "zero_pad_uint8_to": spec.input_size,
        "output": "logits (batch, classes)",
    }


def class_names(info: DatasetInfo) -> list[str]:
    return list(info.classes) or [str(i) for i in range(info.num_classes)]


def export_command(run: Run, n: Node, formats, out_dir: Path | None, bench: bool = False) -> str:
    args = [
        "iterkd",
        "export",
        str(run.run_dir),
        "--node",
        str(n.node),
        "--format",
        "all" if tuple(formats) == FORMATS else formats[0],
    ]
    args += ["-o", str(out_dir)] if out_dir else []
    return shlex.join(args + (["--bench"] if bench else []))


# -- the model card ---------------------------------------------------------------------------


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return "" if v is None else str(v).replace("|", "\\|")  # spec summaries contain '|'

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}%"


def model_card(
    run: Run,
    n: Node,
    files: dict[str, Path],
    diffs: dict[str, float],
    images: int,
    command: str | None,
    bench_md: str = "",
) -> str:
    cfg, root = run.cfg, run.root
    info = dataset_info(cfg.dataset)
    spec = n.spec
    path = ancestry(list(run.nodes.values()), n)
    raw = RAW_SIZE.get(info.name, spec.input_size)
    pad = (spec.input_size - raw) // 2
    mean = ", ".join(f"{m:g}" for m in info.mean)
    std = ", ".join(f"{s:g}" for s in info.std)
    classes = class_names(info)
    out = [
        f"# Model card: {cfg.name}, node {n.node}",
        "",
        f"A {spec.summary()} VGG for **{info.name}**, found by iterkd's knowledge-distillation compression "
        f"search (variant `{cfg.variant}`, space `{cfg.space}`, budget --max-drop {cfg.max_drop:g} points). "
        f"It is {root.spec.params() / spec.params():.1f}x smaller than the root (node {root.node}) in parameters "
        f"and {root.spec.flops() / spec.flops():.1f}x cheaper in FLOPs.",
        "",
        "## Accuracy",
        "",
        markdown_table(
            ["", "this model", f"root (node {root.node})"],
            [
                ["validation (split of train, drives the search)", _pct(n.val_acc), _pct(root.val_acc)],
                ["test (reported only)", _pct(n.test_acc), _pct(root.test_acc)],
                ["drop vs root (validation, points)", f"{root.val_acc - n.val_acc:.2f}", "0"],
            ],
        ),
        "",
        f"Validation: {cfg.val_size} training images split off with seed {cfg.seed}; test: the dataset's "
        "test set.",
        "",
        "## Input and output",
        "",
        f"- input `input`: float32, NCHW, shape (batch, {spec.in_channels}, {spec.input_size}, {spec.input_size}); "
        "the batch size is free.",
        (
            f"- {raw}×{raw} images are zero-padded by {pad} pixels on each side (as uint8, before scaling) to "
            f"{spec.input_size}×{spec.input_size}."
            if pad
            else f"- images are {spec.input_size}×{spec.input_size}."
        ),
        f"- normalisation: x = (pixel / 255 − mean) / std per channel, mean ({mean}), std ({std}).",
        f"- output `logits`: (batch, {spec.num_classes}); softmax gives probabilities.",
        "",
        "Classes (output index: name): " + ", ".join(f"{i}: {c}" for i, c in enumerate(classes)) + ".",
        "",
        "## Size and cost",
        "",
        markdown_table(
            ["", "this model", "root", "root / this"],
            [
                [
                    "parameters",
                    f"{spec.params():,}",
                    f"{root.spec.params():,}",
                    f"{root.spec.params() / spec.params():.1f}x",
                ],
                [
                    "fp32 state bytes",
                    f"{spec.state_bytes():,}",
                    f"{root.spec.state_bytes():,}",
                    f"{root.spec.state_bytes() / spec.state_bytes():.1f}x",
                ],
                [
                    "FLOPs per image",
                    f"{spec.flops():,}",
                    f"{root.spec.flops():,}",
                    f"{root.spec.flops() / spec.flops():.1f}x",
                ],
            ],
        ),
        "",
        "Files: " + ", ".join(f"`{p.name}` {p.stat().st_size:,} bytes" for p in files.values()) + ".",
        "",
        "## Deployment figures recorded during the search",
        "",
    ]
    figures = [
        [
            f"{label} (node {m.node})",
            m.deploy.get("latency_ms_b1"),
            m.deploy.get("throughput_b64"),
            m.deploy.get("cpu_threads"),
            m.deploy.get("onnx_bytes"),
        ]
        for label, m in (("root", root), ("this", n))
    ]
    if all(row[1] is not None for row in figures):
        out += [
            markdown_table(
                ["model", "latency batch 1 (ms)", "throughput batch 64 (img/s)", "CPU threads", "ONNX bytes"],
                figures,
            ),
            "",
            "PyTorch eager on the search machine's CPU, median of repeats after a warm-up; "
            "`iterkd export --bench` measures again here.",
        ]
    else:
        out += [
            "Not recorded for this run (smoke preset, --no-deploy-figures, or a run older than the "
            "feature); `iterkd export --bench` measures them."
        ]
    if bench_md:
        out += ["", "## Measured at export (`--bench`)", "", bench_md]
    out += [
        "",
        "## Lineage",
        "",
        "Each step trained the child from its teachers with "
        f"{cfg.alpha:g}·KD(T={cfg.temperature:g}) + {1 - cfg.alpha:g}·CE + {cfg.hint_weight:g}·hint.",
        "",
        markdown_table(
            ["node", "generation", "operator", "teachers", "architecture", "params", "val acc"],
            [
                [
                    m.node,
                    m.generation,
                    m.operator,
                    ", ".join(map(str, m.teachers)) or "labels only",
                    m.spec.summary(),
                    f"{m.spec.params():,}",
                    _pct(m.val_acc),
                ]
                for m in path
            ],
        ),
        "",
        f"The search stopped: {run.study.user_attrs.get('stop_reason') or 'not yet (still running?)'}.",
        "",
        "## Training settings",
        "",
        markdown_table(
            ["setting", "value"],
            [
                [k, v]
                for k, v in (
                    ("preset", cfg.preset),
                    ("dataset", cfg.dataset),
                    ("train images", cfg.train_subset or "all"),
                    ("root epochs", cfg.root_epochs),
                    ("epochs per child", cfg.epochs),
                    ("batch size", cfg.batch_size),
                    ("peak lr (one-cycle, SGD Nesterov)", cfg.lr),
                    ("weight decay", cfg.weight_decay),
                    ("alpha", cfg.alpha),
                    ("temperature", cfg.temperature),
                    ("hint weight", cfg.hint_weight),
                    ("root width multiplier", cfg.width),
                    ("seed", cfg.seed),
                    ("storage", redact_url(cfg.storage) if cfg.storage else "RUN/study.db"),
                )
            ],
        ),
        "",
        "## Verification",
        "",
        f"Each file was run on {images} images of the run's validation split and compared with the PyTorch "
        f"model (max abs logit difference allowed {MAX_ABS_DIFF:g}):",
        "",
        markdown_table(
            ["file", "runtime", "max abs diff"],
            [
                [
                    files[f].name,
                    {"onnx": "onnxruntime", "torchscript": "torch.jit.load", "safetensors": "iterkd.load"}[f],
                    f"{d:.2g}",
                ]
                for f, d in diffs.items()
            ],
        ),
        "",
        "## Reproduce",
        "",
        "```bash",
        search_command(cfg),
    ]
    if command:
        out += [command]
    out += [
        "```",
        "",
        "```python",
        "import iterkd",
        f"model = iterkd.load({str(next(iter(files.values())).parent)!r})  # eval mode, CPU",
        "```",
        "",
    ]
    return "\n".join(out)
