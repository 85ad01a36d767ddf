"""Ship a node: write its model as ONNX / TorchScript / safetensors with its spec and a model card,
verify every written file against the PyTorch model on real validation images, and load it back."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .checkpoints import load_model
from .config import SearchConfig, search_command
from .data import DatasetInfo, DataSplits, normalize
from .deploy import example_input, onnx_session, write_onnx
from .errors import IterkdError
from .lineage import Node, ancestry
from .models import VGG
from .quantize import (
    DEFAULT_QAT_TEACHER,
    QAT_LR_FACTOR,
    TIMING_REPEATS,
    Int8Figures,
    Int8Result,
    quantization_tools,
    quantize,
)
from .run import Run
from .storage import redact_url

FORMATS = ("onnx", "torchscript", "safetensors")
FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "safetensors": "model.safetensors"}
INT8_FILE = "model.int8.onnx"  # --int8 / --qat-epochs: ONNX Runtime QDQ int8 (iterkd.quantize)
MAX_ABS_DIFF = 1e-4  # fp32 logits of an exported file vs the PyTorch model; more is an error
VERIFY_IMAGES = 64
EXPORT_FORMAT = "iterkd-export-1"


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
    data = run_data(cfg, data_dir, int8=False)
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
            f"{len(x)} validation images); nothing was exported"
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
    int8: Int8Result | None = None  # with --int8 or --qat-epochs: the int8 file and its figures


@dataclass(frozen=True)
class Int8Request:
    """What `iterkd export --int8 [--calibration N] [--qat-epochs N --qat-teacher T] [--force]` asks."""

    calibration: int | None = None  # None: quantize.DEFAULT_CALIBRATION, or every image of a smaller run
    qat_epochs: int = 0
    qat_teacher: str = DEFAULT_QAT_TEACHER
    force: bool = False  # export even when the int8 model's drop exceeds the run's --max-drop
    threads: int = 1
    progress: bool = False


def parse_formats(text: str) -> tuple[str, ...]:
    if text == "all":
        return FORMATS
    if text not in FORMATS:
        raise IterkdError(f"unknown --format {text!r}; choose one of {', '.join(FORMATS)} or all")
    return (text,)


def run_data(source: Run | SearchConfig, data_dir: str | None, int8: bool) -> DataSplits:
    """The run's splits (train subset included: calibration uses the images the run trained on);
    from a Run, checked to be the images the run was made with (Run.load_data)."""
    try:
        if isinstance(source, Run):
            return source.load_data(data_dir=data_dir)
        return (replace(source, data_dir=data_dir) if data_dir else source).load_data()
    except IterkdError as e:
        use = "verify the files and calibrate the int8 model" if int8 else "verify the files"
        raise IterkdError(f"iterkd export needs the run's images to {use}: {e}") from None


def over_budget(run: Run, n: Node, f: Int8Figures) -> IterkdError:
    how = f"{f.method.upper()} int8" + (f" after {f.qat_epochs} QAT epochs" if f.qat_epochs else "")
    return IterkdError(
        f"the int8 model of node {n.node} ({how}) loses too much: validation {f.val_acc:.2f}% against the "
        f"root's {f.root_val_acc:.2f}%, a drop of {f.drop_pts:.2f} points > --max-drop {f.max_drop:g} of "
        f"run {run.cfg.name} (fp32 {f.fp32_val_acc:.2f}%, top-1 agreement {f.agreement_val:.1f}%); nothing "
        "was exported. Fine-tune it with --qat-epochs N, or export it anyway with --force"
    )


def export_node(
    run: Run,
    n: Node,
    formats=FORMATS,
    out_dir: str | Path | None = None,
    *,
    data_dir: str | None = None,
    command: str | None = None,
    bench_md: str = "",
    int8: Int8Request | None = None,
) -> ExportResult:
    """Write node n in `formats` (and, when asked, as int8 ONNX) to out_dir (default RUN/export/node-N),
    verify every file on the run's validation images and the int8 model against the run's budget,
    then write spec.json and MODEL_CARD.md. Everything is written to a staging directory beside
    out_dir and moved in only once all of it is verified: a failed attempt leaves an earlier export
    as it was."""
    if int8 is not None:
        quantization_tools()  # before anything is loaded or written
        if int8.qat_epochs < 0:
            raise IterkdError(f"--qat-epochs must be at least 0, got {int8.qat_epochs}")
    out = Path(out_dir) if out_dir else run.run_dir / "export" / f"node-{n.node}"
    data = run_data(run, data_dir, int8 is not None)
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    except OSError as e:
        raise IterkdError(f"cannot create output directory {out} ({e.strerror})") from None
    try:
        staged, diffs, quantized, images = _write_verified(run, n, formats, stage, data, int8)
        files = {fmt: out / p.name for fmt, p in staged.items()}
        info = data.info
        spec_doc = {
            "format": EXPORT_FORMAT,
            "run": run.cfg.name,
            "node": n.node,
            "architecture": asdict(n.spec),
            "input": input_contract(info, n.spec),
            "classes": info.class_names,
            "files": {f: p.name for f, p in files.items()},
            "verification": {"images": images, "max_abs_diff": diffs, "tolerance": MAX_ABS_DIFF},
            "val_acc": n.val_acc,
            "test_acc": n.test_acc,
        }
        if quantized:
            spec_doc["int8"] = quantized.figures.to_json()
            if quantized.ptq:
                spec_doc["int8"]["ptq"] = quantized.ptq.to_json()
        (stage / "spec.json").write_text(json.dumps(spec_doc, indent=2) + "\n")
        sizes = {fmt: p.stat().st_size for fmt, p in staged.items()}
        card = model_card(run, n, data, files, sizes, diffs, images, command, bench_md, quantized)
        (stage / "MODEL_CARD.md").write_text(card)
        _publish(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if quantized:
        quantized = replace(quantized, path=out / INT8_FILE)
    return ExportResult(n.node, out, files, diffs, out / "MODEL_CARD.md", quantized)


def _write_verified(run: Run, n: Node, formats, stage: Path, data: DataSplits, int8: Int8Request | None):
    """Every requested file written to `stage` and verified; raises IterkdError at the first that
    fails (a differing file, an int8 model over the budget without --force)."""
    model = run.model(n)
    writers = {
        "onnx": lambda p: write_onnx(model, p, onnx_metadata(data.info)),
        "torchscript": lambda p: write_torchscript(model, p),
        "safetensors": lambda p: write_safetensors(run, n, p),
    }
    files = {fmt: writers[fmt](stage / FILES[fmt]) for fmt in formats}
    x = normalize(data.val_x[:VERIFY_IMAGES], data.info)
    diffs = verify(run.model(n), files, x)  # a fresh copy: a writer that altered `model` cannot hide it
    quantized = None
    if int8 is not None:
        quantized = quantize(
            run,
            n,
            stage / INT8_FILE,
            data,
            calibration=int8.calibration,
            qat_epochs=int8.qat_epochs,
            qat_teacher=int8.qat_teacher,
            threads=int8.threads,
            progress=int8.progress,
        )
        if not quantized.figures.within_budget and not int8.force:
            raise over_budget(run, n, quantized.figures)
        files["int8"] = quantized.path
    return files, diffs, quantized, len(x)


def _publish(stage: Path, out: Path) -> None:
    """Move the staged files into out: the old card and spec go first (a card must never vouch for
    files it did not verify), each file is replaced in one rename, the new card and spec come last."""
    for name in ("spec.json", "MODEL_CARD.md"):
        (out / name).unlink(missing_ok=True)
    staged = sorted(stage.iterdir(), key=lambda p: p.name in ("spec.json", "MODEL_CARD.md"))
    for p in staged:
        os.replace(p, out / p.name)


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


def onnx_metadata(info: DatasetInfo) -> dict[str, str]:
    """What a deployed ONNX file carries about its outputs and inputs (its metadata_props), so its
    logits map back to class names wherever it runs."""
    return {
        "classes": json.dumps(info.class_names),
        "dataset": info.name,
        "mean": json.dumps(list(info.mean)),
        "std": json.dumps(list(info.std)),
    }


def export_command(
    run: Run, n: Node, formats, out_dir: Path | None, bench: bool = False, int8: Int8Request | None = None
) -> str:
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
    args += ["--bench"] if bench else []
    if int8 is not None:
        args += ["--int8"] + (["--calibration", str(int8.calibration)] if int8.calibration else [])
        if int8.qat_epochs:
            args += ["--qat-epochs", str(int8.qat_epochs), "--qat-teacher", int8.qat_teacher]
        args += ["--force"] if int8.force else []
    return shlex.join(args)


# -- the model card ---------------------------------------------------------------------------


def int8_section(r: Int8Result) -> list[str]:
    """The card's int8 part: the fp32 model beside post-training int8 (and quantisation-aware int8)."""
    columns = [r.ptq, r.figures] if r.ptq else [r.figures]
    f = r.figures
    names = {"ptq": "int8 PTQ", "qat": f"int8 QAT ({f.qat_epochs} epochs, teacher: {f.qat_teacher})"}

    def row(label, fp32, key, fmt):
        return [label, fp32] + [fmt(getattr(c, key)) for c in columns]

    rows = [
        row("validation accuracy", _pct(f.fp32_val_acc), "val_acc", _pct),
        row("test accuracy", _pct(f.fp32_test_acc), "test_acc", _pct),
        ["top-1 agreement with fp32 (validation / test)", "100%"]
        + [f"{c.agreement_val:.2f}% / {c.agreement_test:.2f}%" for c in columns],
        [
            f"drop vs root's {f.root_val_acc:.2f}% (validation, points)",
            f"{f.root_val_acc - f.fp32_val_acc:.2f}",
        ]
        + [f"{c.drop_pts:.2f}" + ("" if c.within_budget else " (over budget)") for c in columns],
        row("ONNX file bytes", f"{f.fp32_bytes:,}", "int8_bytes", lambda v: f"{v:,}"),
        row(
            "onnxruntime latency batch 1 (ms)",
            f"{f.fp32_latency_ms_b1:.3f}",
            "latency_ms_b1",
            "{:.3f}".format,
        ),
        row(
            "onnxruntime throughput batch 64 (img/s)",
            f"{f.fp32_throughput_b64:,.0f}",
            "throughput_b64",
            "{:,.0f}".format,
        ),
    ]
    load = ", ".join(f"{v:.2f}" for v in f.load_average)
    text = [
        "## int8",
        "",
        f"`{INT8_FILE}` is {f.method.upper()} int8: ONNX Runtime static quantisation in QDQ format, int8 "
        "weights symmetric per output channel, uint8 activations per tensor with MinMax ranges calibrated "
        f"on the first {f.calibration_images:,} images of the run's training split; batch norm folded into "
        "the convolutions first. Input and output are float32 as above.",
        "",
        markdown_table(["", "fp32", *(names[c.method] for c in columns)], rows),
        "",
        f"Accuracies over the run's whole validation and test splits, the int8 model run by onnxruntime. "
        f"Speed: onnxruntime, {f.threads} thread(s), median of {TIMING_REPEATS} batch-1 and "
        f"{TIMING_REPEATS // 4} batch-64 calls after a warm-up, load average {load} on "
        f"{os.cpu_count()} CPUs; fp32 is the BN-folded ONNX file the int8 one was made from.",
    ]
    if f.method == "qat":
        text += [
            "",
            f"QAT: the node was fine-tuned for {f.qat_epochs} epochs with fake quantisation of weights and "
            f"activations, KD from {'its own fp32 weights' if f.qat_teacher == 'self' else 'the root'} and CE "
            f"through iterkd's training loop (the run's alpha, temperature and batch size, {QAT_LR_FACTOR:g}× its "
            "peak learning rate, no hint), then quantised by the same PTQ pipeline.",
        ]
    if not f.within_budget:
        text += [
            "",
            f"**Over the budget:** a drop of {f.drop_pts:.2f} points exceeds the run's --max-drop "
            f"{f.max_drop:g}; exported with --force.",
        ]
    return text


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
    data: DataSplits,
    files: dict[str, Path],
    sizes: dict[str, int],
    diffs: dict[str, float],
    images: int,
    command: str | None,
    bench_md: str = "",
    int8: Int8Result | None = None,
) -> str:
    cfg, root, info = run.cfg, run.root, data.info
    spec = n.spec
    path = ancestry(list(run.nodes.values()), n)
    raw = info.raw_size or spec.input_size
    pad = (spec.input_size - raw) // 2
    mean = ", ".join(f"{m:g}" for m in info.mean)
    std = ", ".join(f"{s:g}" for s in info.std)
    classes = info.class_names
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
        f"Validation: {len(data.val_x):,} images"
        + (
            " (the folder's val/)"
            if data.val_from_folder
            else f", split off the training images with seed {cfg.data_seed}"
        )
        + "; "
        + (
            "test: the dataset's test set."
            if data.has_test
            else "no test set: test accuracy is not measured."
        ),
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
        "Files: " + ", ".join(f"`{p.name}` {sizes[f]:,} bytes" for f, p in files.items()) + ".",
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
    if int8:
        out += ["", *int8_section(int8)]
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
