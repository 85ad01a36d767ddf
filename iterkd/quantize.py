"""int8 models of a node, checked against its fp32 model and the run's budget.

`quantize(run, node, path)` writes one int8 ONNX file with ONNX Runtime's static quantisation (QDQ
format, per-channel symmetric int8 weights, uint8 activations whose ranges are calibrated on the
run's training images) and returns what verifies it: validation and test accuracy of the int8 model
in onnxruntime beside the fp32 model's, the share of top-1 predictions they agree on, batch-1 latency
and batch-64 throughput of both in onnxruntime, file sizes, and the drop against the root under the
run's one budget test. With `qat_epochs` the node is first fine-tuned with fake quantisation and
knowledge distillation through iterkd's own training loop, then quantised by the same pipeline, so
post-training and quantisation-aware int8 differ only in their weights.

Batch norm is folded into the convolutions before anything is quantised: a deployed int8 conv has no
separate BN, so its weights must be quantised as they will run.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import load_model
from .data import DataSplits, normalize
from .deploy import DEFAULT_THREADS, onnx_session, onnx_timing, write_onnx
from .device import resolve_device
from .errors import IterkdError
from .lineage import Node, within_budget
from .models import VGG
from .run import Run
from .train import train
from .trainer import train_settings

# Training images the activation ranges are calibrated on (the first N of the run's training split,
# which load_data has already shuffled with the run's seed). Measured (docs/export.md): 32 to 2,048
# images gave the same accuracy; 512 keeps a margin for rare extremes at under a second's cost.
DEFAULT_CALIBRATION = 512
CALIBRATION_BATCH = 64
EVAL_BATCH = 1000
TIMING_REPEATS = 40
# Weights: signed int8, symmetric per output channel in [-127, 127] (ORT's symmetric int8 range, zero
# point 0). Activations: unsigned int8, asymmetric per tensor; the x86 choice ORT documents for CPUs
# with VNNI (this machine has it; without VNNI ORT suggests reduce_range, which we do not set).
WEIGHT_QMIN, WEIGHT_QMAX = -127, 127
ACT_QMIN, ACT_QMAX = 0, 255
# QAT fine-tunes an already trained model without BN: a hundredth of the run's peak learning rate
# (one-cycle). A tenth lost 2 points on a Fashion-MNIST child where a hundredth gained (docs/export.md).
QAT_LR_FACTOR = 0.01
QAT_TEACHERS = ("self", "root")
# The node's own fp32 weights: QAT only has to undo rounding, and the node's fp32 function is one its
# architecture can reach (measured against the root in docs/export.md).
DEFAULT_QAT_TEACHER = "self"


def quantization_tools():
    """onnxruntime.quantization, or one line naming the fix when this onnxruntime has none."""
    try:
        import onnxruntime.quantization as q
        from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static  # noqa: F401
    except ImportError as e:
        raise IterkdError(
            f"--int8 needs onnxruntime's quantisation tools (onnxruntime.quantization: {e}); "
            "install the full CPU package: pip install 'onnxruntime>=1.18'"
        ) from None
    return q


# -- the fp32 model that is quantised -----------------------------------------------------------


@torch.no_grad()
def fold_batch_norm(model: VGG) -> VGG:
    """The same function as `model` (in eval mode) as a VGG without batch norm: each BN's scale and
    shift folded into the conv before it."""
    model = model.to("cpu").eval()
    folded = VGG(replace(model.spec, batch_norm=False)).eval()
    for src, dst in zip(model.blocks, folded.blocks):
        convs = [m for m in dst if isinstance(m, nn.Conv2d)]
        layers = list(src)
        for conv, i in zip(convs, [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]):
            c = layers[i]
            bn = layers[i + 1] if i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d) else None
            if bn is None:
                conv.weight.copy_(c.weight)
                conv.bias.copy_(c.bias)
                continue
            k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.copy_(c.weight * k.view(-1, 1, 1, 1))
            conv.bias.copy_((c.bias - bn.running_mean) * k + bn.bias)
    folded.head.load_state_dict(model.head.state_dict())
    if model.spec.hidden:
        folded.hidden.load_state_dict(model.hidden.state_dict())
    return folded


class _CalibrationBatches:
    """ONNX Runtime's CalibrationDataReader protocol (it accepts any object with get_next)."""

    def __init__(self, images: np.ndarray):
        self._batches = iter(
            [{"input": images[i : i + CALIBRATION_BATCH]} for i in range(0, len(images), CALIBRATION_BATCH)]
        )

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def calibration_images(data: DataSplits, n: int | None = None) -> np.ndarray:
    """The first n training images (default: DEFAULT_CALIBRATION, or all when the run has fewer),
    normalised as in training, un-augmented (what a deployment sees)."""
    n = min(DEFAULT_CALIBRATION, len(data.train_x)) if n is None else n
    if not 1 <= n <= len(data.train_x):
        raise IterkdError(
            f"--calibration must be between 1 and the run's {len(data.train_x)} training images, got {n}"
        )
    return normalize(data.train_x[:n].cpu(), data.info).numpy()


def write_int8(model: VGG, path: str | Path, calibration: np.ndarray, fp32_path: str | Path) -> Path:
    """Quantise `model` to an int8 QDQ ONNX file at `path`, from the fp32 ONNX file of the model with
    BN folded, which is left at `fp32_path` (the fp32 side of the verification)."""
    q = quantization_tools()
    path, fp32_path = Path(path), Path(fp32_path)
    write_onnx(fold_batch_norm(model), fp32_path)
    with tempfile.TemporaryDirectory(prefix="iterkd-int8-") as tmp:
        # Shape inference and graph optimisation first, as ORT recommends before quantize_static.
        q.quant_pre_process(str(fp32_path), str(Path(tmp) / "pre.onnx"))
        q.quantize_static(
            str(Path(tmp) / "pre.onnx"),
            str(path),
            _CalibrationBatches(calibration),
            quant_format=q.QuantFormat.QDQ,
            per_channel=True,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            calibrate_method=q.CalibrationMethod.MinMax,
        )
    compact_names(path)
    return path


def compact_names(path: Path) -> None:
    """Rename the int8 graph's internal tensors to short hex ids, drop its node names and the shape
    annotations of intermediate tensors (onnxruntime infers them at load), keeping the model's input
    and output names. quantize_static names every tensor and node after the fp32 one plus a suffix
    ('blocks.0.0.weight_DequantizeLinear_Output'); in a student of 50k parameters those strings were
    a sixth of the file, and no runtime reads them."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    kept = {v.name for v in [*graph.input, *graph.output]}
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in kept:
            return name
        if name not in short:
            short[name] = format(len(short), "x")  # hex digits: never 'input' or 'logits'
        return short[name]

    for t in graph.initializer:
        t.name = rename(t.name)
    del graph.value_info[:]
    for node in graph.node:
        node.name = ""
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


# -- verification -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int8Figures:
    """What verifies an int8 file: accuracies are percentages, drop in points against the root's
    validation accuracy; latency and throughput in onnxruntime with `threads` threads."""

    method: str  # "ptq" (post-training) or "qat" (quantisation-aware distillation, then the same PTQ)
    calibration_images: int
    qat_epochs: int
    qat_teacher: str | None
    val_acc: float
    test_acc: float
    fp32_val_acc: float
    fp32_test_acc: float
    agreement_val: float  # % of validation images whose int8 top-1 equals the fp32 model's
    agreement_test: float
    root_val_acc: float
    drop_pts: float
    max_drop: float
    within_budget: bool
    int8_bytes: int
    fp32_bytes: int  # the fp32 ONNX file (BN folded) the int8 file was made from
    latency_ms_b1: float
    throughput_b64: float
    fp32_latency_ms_b1: float
    fp32_throughput_b64: float
    threads: int
    load_average: tuple[float, float, float]

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Int8Result:
    path: Path
    figures: Int8Figures
    ptq: Int8Figures | None = None  # with QAT: post-training int8 of the same node, for comparison


def _predictions(forward, x: torch.Tensor, info) -> np.ndarray:
    return np.concatenate(
        [
            forward(normalize(x[i : i + EVAL_BATCH].cpu(), info)).argmax(1)
            for i in range(0, len(x), EVAL_BATCH)
        ]
    )


def _fp32_predictions(model: VGG, x: torch.Tensor, info) -> np.ndarray:
    model = model.to("cpu").eval()
    with torch.inference_mode():
        return _predictions(lambda b: model(b).numpy(), x, info)


def _onnx_predictions(path: Path, x: torch.Tensor, info) -> np.ndarray:
    session = onnx_session(path)
    return _predictions(lambda b: session.run(None, {"input": b.numpy()})[0], x, info)


def _pct(hits: np.ndarray) -> float:
    return round(100.0 * float(hits.mean()), 4) if len(hits) else 0.0


def verify_int8(
    run: Run,
    node: Node,
    fp32: VGG,
    path: Path,
    fp32_file: Path,
    data: DataSplits,
    *,
    method: str,
    calibration: int,
    qat_epochs: int = 0,
    qat_teacher: str | None = None,
    threads: int = DEFAULT_THREADS,
) -> Int8Figures:
    """Accuracy, agreement, speed and size of the int8 file against `fp32` (the node's model)."""
    val_y, test_y = data.val_y.cpu().numpy(), data.test_y.cpu().numpy()
    ref_val, ref_test = (_fp32_predictions(fp32, x, data.info) for x in (data.val_x, data.test_x))
    got_val, got_test = (_onnx_predictions(path, x, data.info) for x in (data.val_x, data.test_x))
    fp32_timing = onnx_timing(fp32_file, fp32.spec, threads, TIMING_REPEATS)
    int8_timing = onnx_timing(path, fp32.spec, threads, TIMING_REPEATS)
    root = run.root
    val = _pct(got_val == val_y)
    drop = round(root.val_acc - val, 4)
    return Int8Figures(
        method=method,
        calibration_images=calibration,
        qat_epochs=qat_epochs,
        qat_teacher=qat_teacher,
        val_acc=val,
        test_acc=_pct(got_test == test_y),
        fp32_val_acc=_pct(ref_val == val_y),
        fp32_test_acc=_pct(ref_test == test_y),
        agreement_val=_pct(got_val == ref_val),
        agreement_test=_pct(got_test == ref_test),
        root_val_acc=root.val_acc,
        drop_pts=drop,
        max_drop=run.cfg.max_drop,
        within_budget=within_budget(drop, run.cfg.max_drop),
        int8_bytes=path.stat().st_size,
        fp32_bytes=fp32_file.stat().st_size,
        latency_ms_b1=int8_timing.latency_ms_b1,
        throughput_b64=int8_timing.throughput_b64,
        fp32_latency_ms_b1=fp32_timing.latency_ms_b1,
        fp32_throughput_b64=fp32_timing.throughput_b64,
        threads=threads,
        load_average=tuple(round(v, 2) for v in os.getloadavg()),
    )


def fp32_onnx_figures(model: VGG, threads: int = DEFAULT_THREADS) -> tuple[int, float]:
    """(file bytes, onnxruntime batch-1 ms) of `model` as fp32 ONNX with batch norm folded: what the
    int8 figures' fp32 columns measure, for a model that gets no int8 file (the root)."""
    with tempfile.TemporaryDirectory(prefix="iterkd-fp32-") as tmp:
        path = write_onnx(fold_batch_norm(model), Path(tmp) / "fp32.onnx")
        return path.stat().st_size, onnx_timing(path, model.spec, threads, TIMING_REPEATS).latency_ms_b1


# -- quantisation-aware distillation -------------------------------------------------------------


class _ActivationQuant(nn.Module):
    """Fake uint8 quantisation of a tensor, per tensor, with the range ORT's MinMax calibration would
    give it: an exponential moving average of batch min/max while training, frozen in eval."""

    def __init__(self, momentum: float = 0.01):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            lo, hi = x.detach().min(), x.detach().max()
            m = torch.where(self.seen, self.momentum, 1.0)
            self.lo.lerp_(lo, m)
            self.hi.lerp_(hi, m)
            self.seen.fill_(True)
        lo, hi = self.lo.clamp(max=0), self.hi.clamp(min=0)  # 0 must be exact, as in ORT
        scale = ((hi - lo) / (ACT_QMAX - ACT_QMIN)).clamp(min=1e-8).float()
        zero = (ACT_QMIN - lo / scale).round().clamp(ACT_QMIN, ACT_QMAX).int()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, ACT_QMIN, ACT_QMAX)


def _weight_quant(w: torch.Tensor) -> torch.Tensor:
    """Fake symmetric int8 quantisation per output channel, as ORT quantises weights."""
    absmax = w.detach().abs().flatten(1).amax(1)
    scale = (absmax / WEIGHT_QMAX).clamp(min=1e-8).float()
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, WEIGHT_QMIN, WEIGHT_QMAX)


class _QuantConv2d(nn.Conv2d):
    """A conv that sees its input and weights as the int8 model will (its input is the previous
    ReLU's output after max-pooling, which keeps the quantisation grid)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
        self.load_state_dict(conv.state_dict())
        self.input_quant = _ActivationQuant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quant(x), _weight_quant(self.weight), self.bias)


class _QuantLinear(nn.Linear):
    """The classifier head with its input, weights and logits quantised as in the int8 model."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features)
        self.load_state_dict(linear.state_dict())
        self.input_quant = _ActivationQuant()
        self.output_quant = _ActivationQuant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quant(F.linear(self.input_quant(x), _weight_quant(self.weight), self.bias))


def fake_quantized(model: VGG) -> VGG:
    """`model` with BN folded and every conv and the head fake-quantised: still a VGG, so iterkd's
    training loop trains it as it is."""
    qat = fold_batch_norm(model)
    for block in qat.blocks:
        for i, layer in enumerate(block):
            if isinstance(layer, nn.Conv2d):
                block[i] = _QuantConv2d(layer)
    qat.head = _QuantLinear(qat.head)
    if qat.spec.hidden:
        for i, layer in enumerate(qat.hidden):
            if isinstance(layer, nn.Linear):
                qat.hidden[i] = _QuantLinear(layer)
    return qat


def plain(qat: VGG) -> VGG:
    """The fine-tuned weights as an ordinary (BN-free) VGG, ready for the PTQ pipeline."""
    model = VGG(qat.spec)
    missing, _ = model.load_state_dict(qat.state_dict(), strict=False)
    assert not missing, missing
    return model.eval()


def qat_teachers(run: Run, node: Node, teacher: str) -> list[VGG]:
    """The fp32 teachers of quantisation-aware distillation: the node's own weights, or the root
    (every member of an ensemble root)."""
    if teacher not in QAT_TEACHERS:
        raise IterkdError(f"unknown --qat-teacher {teacher!r}; choose one of {', '.join(QAT_TEACHERS)}")
    if teacher == "self":
        return [run.model(node)]
    root = run.root
    if root.members:
        return [load_model(run.run_dir / m["checkpoint"]) for m in root.members]
    return [run.model(root)]


def distil_quantized(
    run: Run, node: Node, data: DataSplits, epochs: int, teacher: str, *, progress: bool = False
) -> VGG:
    """Fine-tune node's model for `epochs` with fake quantisation, KD from `teacher` and CE, through
    iterkd's training loop (run's batch size, alpha, temperature; QAT_LR_FACTOR of its learning rate; no
    hint: the student keeps its architecture). Returns the fine-tuned fp32 weights as a plain VGG."""
    device = resolve_device(run.cfg.device)
    teachers = qat_teachers(run, node, teacher)
    student = fake_quantized(run.model(node))
    base = train_settings(run.cfg, epochs, run.cfg.seed, child=True)
    settings = replace(
        base,
        lr=run.cfg.lr * QAT_LR_FACTOR,
        loss=replace(base.loss, hint_weight=0.0),
        precision="fp32",  # fake quantisation simulates int8 on fp32 values; bf16 would add its own error
        compile="off",
    )
    train(
        student,
        data.to(device),
        settings,
        teachers=teachers,
        desc=f"QAT node {node.node}",
        progress=progress,
    )
    return plain(student.to("cpu"))


# -- the one call --------------------------------------------------------------------------------


def quantize(
    run: Run,
    node: Node,
    path: str | Path,
    data: DataSplits,
    *,
    calibration: int | None = None,
    qat_epochs: int = 0,
    qat_teacher: str = DEFAULT_QAT_TEACHER,
    threads: int = DEFAULT_THREADS,
    progress: bool = False,
) -> Int8Result:
    """Write node's int8 ONNX model to `path` and verify it (see Int8Figures), calibrated on
    `calibration` training images (default DEFAULT_CALIBRATION). With `qat_epochs` > 0
    the file holds the quantisation-aware distilled weights, and `ptq` the post-training figures of
    the same node for comparison. Budget refusal is the caller's: `figures.within_budget`."""
    quantization_tools()
    if qat_epochs < 0:
        raise IterkdError(f"--qat-epochs must be at least 0, got {qat_epochs}")
    images = calibration_images(data, calibration)
    calibration = len(images)
    fp32 = run.model(node)
    path = Path(path)
    common = dict(calibration=calibration, threads=threads)
    with tempfile.TemporaryDirectory(prefix="iterkd-int8-", dir=path.parent) as tmp:
        fp32_file, ptq_path = Path(tmp) / "fp32.onnx", Path(tmp) / path.name
        write_int8(fp32, ptq_path, images, fp32_file)
        ptq = verify_int8(run, node, fp32, ptq_path, fp32_file, data, method="ptq", **common)
        if not qat_epochs:
            os.replace(ptq_path, path)
            return Int8Result(path, ptq)
        tuned = distil_quantized(run, node, data, qat_epochs, qat_teacher, progress=progress)
        write_int8(tuned, path, images, fp32_file)
        figures = verify_int8(
            run,
            node,
            fp32,
            path,
            fp32_file,
            data,
            method="qat",
            qat_epochs=qat_epochs,
            qat_teacher=qat_teacher,
            **common,
        )
    return Int8Result(path, figures, ptq)
