"""int8 export of a smoke run's node: post-training and quantisation-aware int8 ONNX files that
onnxruntime runs with the accuracy the card states; the budget holds after quantisation; bad input is
one line and never costs an earlier export."""

import json
import shutil
import sys
from pathlib import Path

import onnx
import pytest
import torch

import iterkd
from iterkd.arch import VGGSpec
from iterkd.data import normalize
from iterkd.export import FILES, INT8_FILE, onnx_session
from iterkd.models import VGG
from iterkd.quantize import fold_batch_norm, quantize
from iterkd.run import open_run
from tests.test_cli import one_line_error, run


def accuracy(path, x, y, info) -> float:
    """Top-1 accuracy (%) of an ONNX file in onnxruntime, computed here independently of iterkd."""
    logits = onnx_session(path).run(None, {"input": normalize(x, info).numpy()})[0]
    return 100.0 * float((logits.argmax(1) == y.numpy()).mean())


def int8_weights(path) -> set[str]:
    """Names of the int8 weight tensors of an ONNX file (rank 2 and 4; zero points have rank 0 or 1)."""
    model = onnx.load(str(path))
    return {
        t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2
    }


def snapshot(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.fixture
def budget_run(smoke_run, tmp_path):
    """A copy of the smoke run whose --max-drop is `set_budget(points)` (the shared run stays as it is)."""
    cfg, _ = smoke_run
    copy = tmp_path / "copy"
    shutil.copytree(cfg.run_dir, copy)

    def set_budget(points: float, **changes):
        saved = json.loads((copy / "config.json").read_text())
        saved.update(max_drop=points, **changes)
        (copy / "config.json").write_text(json.dumps(saved))
        return copy

    return set_budget


def test_fold_batch_norm_keeps_the_function():
    torch.manual_seed(0)
    model = VGG(VGGSpec(blocks=((4, 4), (8,)), in_channels=3, num_classes=5, input_size=8))
    for m in model.modules():  # statistics and affine terms far from the identity BN starts with
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    x = torch.randn(4, 3, 8, 8)
    folded = fold_batch_norm(model)
    assert not folded.spec.batch_norm and not any(
        isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()
    )
    with torch.no_grad():
        assert (folded(x) - model.eval()(x)).abs().max() < 1e-5


def test_int8_export_runs_in_onnxruntime_with_the_accuracy_the_card_states(smoke_run, tmp_path, capsys):
    cfg, outcome = smoke_run
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "export", cfg.run_dir, "--format", "onnx", "--int8", "-o", str(out))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [FILES["onnx"], INT8_FILE, "spec.json", "MODEL_CARD.md"]
    )
    f = json.loads((out / "spec.json").read_text())["int8"]
    assert f["method"] == "ptq" and f["calibration_images"] == 512 and f["within_budget"]

    data = cfg.load_data()
    assert accuracy(out / INT8_FILE, data.val_x, data.val_y, data.info) == pytest.approx(f["val_acc"])
    assert accuracy(out / INT8_FILE, data.test_x, data.test_y, data.info) == pytest.approx(f["test_acc"])
    assert f["fp32_val_acc"] == pytest.approx(outcome.final.val_acc)  # the fp32 model scored as in the search
    assert f["drop_pts"] == pytest.approx(outcome.root.val_acc - f["val_acc"])
    assert 90 <= f["agreement_val"] <= 100 and 90 <= f["agreement_test"] <= 100
    # really int8: every conv and the head carry int8 weights, and the file is smaller than fp32's
    assert len(int8_weights(out / INT8_FILE)) == sum(len(b) for b in outcome.final.spec.blocks) + 1
    assert f["int8_bytes"] == (out / INT8_FILE).stat().st_size < f["fp32_bytes"]
    assert f["latency_ms_b1"] > 0 and f["throughput_b64"] > 0 and f["threads"] == 1
    # deployable files: the exporter's stack traces (this machine's paths) are gone, the int8 graph's
    # internal names are short, and its input and output keep the names a caller feeds and reads
    source_dir = str(Path(iterkd.__file__).resolve().parent).encode()
    assert (
        source_dir not in (out / FILES["onnx"]).read_bytes()
        and source_dir not in (out / INT8_FILE).read_bytes()
    )
    graph = onnx.load(str(out / INT8_FILE)).graph
    assert [v.name for v in graph.input] == ["input"] and [v.name for v in graph.output] == ["logits"]
    assert all(len(t.name) <= 3 for t in graph.initializer) and not any(n.metadata_props for n in graph.node)

    card = (out / "MODEL_CARD.md").read_text()
    assert "## int8" in card and "| validation accuracy | " in card
    assert f"| {f['fp32_val_acc']:.2f}% | {f['val_acc']:.2f}% |" in card
    assert "--int8" in card  # the command that reproduces the export
    assert f"PTQ int8: val {f['val_acc']:.2f}%" in stdout and INT8_FILE in stdout


def test_an_int8_model_over_the_budget_is_refused_keeping_the_earlier_export(budget_run, tmp_path, capsys):
    run_dir = budget_run(0.01)  # the fp32 final node itself is 1 point below the root
    out = tmp_path / "out"
    code, _, err = run(capsys, "export", str(run_dir), "--format", "onnx", "-o", str(out))
    assert code == 0, err
    before = snapshot(out)

    code, _, err = run(capsys, "export", str(run_dir), "--format", "onnx", "--int8", "-o", str(out))
    one_line_error(
        code, err, "a drop of", "> --max-drop 0.01", "nothing was exported", "--qat-epochs N", "--force"
    )
    assert snapshot(out) == before  # not a byte of the earlier export changed, no int8 file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "out"]  # no staging directory left

    code, _, err = run(
        capsys, "export", str(run_dir), "--format", "onnx", "--int8", "--force", "-o", str(out)
    )
    assert code == 0, err
    assert (out / INT8_FILE).is_file() and "**Over the budget:**" in (out / "MODEL_CARD.md").read_text()
    assert not json.loads((out / "spec.json").read_text())["int8"]["within_budget"]


def test_qat_writes_an_int8_model_onnxruntime_runs_with_the_stated_accuracy(smoke_run, tmp_path):
    cfg, outcome = smoke_run
    run_ = open_run(cfg.run_dir)
    data = cfg.load_data()
    result = quantize(run_, outcome.final, tmp_path / INT8_FILE, data, qat_epochs=1)
    f, ptq = result.figures, result.ptq
    assert (f.method, f.qat_epochs, f.qat_teacher, ptq.method) == ("qat", 1, "self", "ptq")
    assert accuracy(result.path, data.val_x, data.val_y, data.info) == pytest.approx(f.val_acc)
    assert accuracy(result.path, data.test_x, data.test_y, data.info) == pytest.approx(f.test_acc)
    assert f.fp32_val_acc == ptq.fp32_val_acc  # both compared with the node's own fp32 model
    assert len(int8_weights(result.path)) == sum(len(b) for b in outcome.final.spec.blocks) + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [INT8_FILE]  # the PTQ file was temporary


def test_qat_export_compares_qat_with_ptq_in_the_card(smoke_run, tmp_path, capsys):
    cfg, _ = smoke_run
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys,
        "export",
        cfg.run_dir,
        "--format",
        "safetensors",
        "--qat-epochs",
        "1",
        "--qat-teacher",
        "root",
        "-o",
        str(out),
    )
    assert code == 0, err
    spec = json.loads((out / "spec.json").read_text())["int8"]
    assert spec["method"] == "qat" and spec["qat_teacher"] == "root" and spec["ptq"]["method"] == "ptq"
    card = (out / "MODEL_CARD.md").read_text()
    assert "| fp32 | int8 PTQ | int8 QAT (1 epochs, teacher: root) |" in card
    assert "--qat-epochs 1 --qat-teacher root" in card
    assert "post-training int8: val" in stdout and "QAT int8: val" in stdout


def test_int8_bad_input_is_one_line_and_keeps_the_earlier_export(budget_run, tmp_path, capsys, monkeypatch):
    run_dir = budget_run(60.0)
    out = tmp_path / "out"
    code, _, err = run(capsys, "export", str(run_dir), "--format", "onnx", "-o", str(out))
    assert code == 0, err
    before = snapshot(out)
    for argv, needles in [
        (["--qat-epochs", "-1"], ["argument --qat-epochs: must be at least 0, got -1"]),
        (["--int8", "--calibration", "0"], ["argument --calibration: must be at least 1, got 0"]),
        (
            ["--int8", "--calibration", "100000"],
            ["--calibration must be between 1 and the run's", "training images"],
        ),
        (
            ["--qat-epochs", "1", "--qat-teacher", "parent"],
            ["argument --qat-teacher: invalid choice: 'parent'"],
        ),
        (["--force"], ["--force is only for int8 exports; add --int8"]),
    ]:
        code, _, err = run(capsys, "export", str(run_dir), "--format", "onnx", "-o", str(out), *argv)
        one_line_error(code, err, *needles)
        assert snapshot(out) == before

    with monkeypatch.context() as m:  # an onnxruntime without its quantisation tools
        m.setitem(sys.modules, "onnxruntime.quantization", None)
        code, _, err = run(capsys, "export", str(run_dir), "--int8", "-o", str(out))
    one_line_error(
        code, err, "--int8 needs onnxruntime's quantisation tools", "pip install 'onnxruntime>=1.18'"
    )
    assert snapshot(out) == before

    missing = tmp_path / "no-data"
    budget_run(60.0, dataset="mnist", download=False, data_dir=str(missing))  # the images are not there
    code, _, err = run(capsys, "export", str(run_dir), "--int8", "-o", str(out))
    one_line_error(
        code,
        err,
        "needs the run's images to verify the files and calibrate the int8 model",
        str(missing),
        "--data-dir",
    )
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "out"]


def test_a_search_ending_in_int8_records_the_int8_model_and_reports_it(smoke_run, tmp_path, capsys):
    cfg, outcome = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(cfg.run_dir, copy)
    code, stdout, err = run(capsys, "resume", str(copy), "--final", "int8", "--no-progress")
    assert code == 0, err
    r = open_run(copy).study.user_attrs["int8"]
    final = outcome.final
    assert r["node"] == final.node and r["method"] == "ptq" and r["within_budget"]
    path = copy / "export" / f"node-{final.node}" / INT8_FILE
    assert r["path"] == str(path) and r["bytes"] == path.stat().st_size < r["fp32_bytes"]
    data = cfg.load_data()
    assert accuracy(path, data.val_x, data.val_y, data.info) == pytest.approx(r["val_acc"])
    assert accuracy(path, data.test_x, data.test_y, data.info) == pytest.approx(r["test_acc"])
    assert r["drop"] == pytest.approx(outcome.root.val_acc - r["val_acc"])
    # the root's fp32 figures beside it: its BN-folded ONNX file is larger than the final's
    assert (
        r["root_fp32_bytes"] > r["fp32_bytes"] and r["root_fp32_latency_ms_b1"] > 0 and r["latency_ms_b1"] > 0
    )
    assert f"int8 of node {final.node} (PTQ" in stdout and f"{r['root_fp32_bytes']:,} B root fp32" in stdout
    assert f"int8 of node {final.node} (PTQ" in (copy / "report.md").read_text()
    nodes_before = {n.node: (n.state, n.val_acc) for n in open_run(copy).nodes.values()}
    # resumed again: the file is reused, nothing is trained or exported again
    mtime = path.stat().st_mtime_ns
    code, stdout, err = run(capsys, "resume", str(copy), "--final", "int8", "--no-progress")
    assert code == 0, err
    assert "(already exported)" in stdout, stdout
    assert path.stat().st_mtime_ns == mtime
    assert {n.node: (n.state, n.val_acc) for n in open_run(copy).nodes.values()} == nodes_before


def test_a_search_whose_int8_model_is_over_budget_says_so_and_keeps_its_nodes(
    smoke_run, tmp_path, capsys, monkeypatch
):
    cfg, outcome = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(cfg.run_dir, copy)
    before = {n.node: (n.state, n.val_acc) for n in open_run(copy).nodes.values()}
    monkeypatch.setattr("iterkd.quantize.within_budget", lambda drop, max_drop: False)  # int8 loses too much
    code, _, err = run(capsys, "resume", str(copy), "--final", "int8", "--no-progress")
    one_line_error(code, err, "--final int8", "loses too much", "--qat-epochs", "the search's nodes are kept")
    run_after = open_run(copy)
    assert "int8" not in run_after.study.user_attrs
    assert not (copy / "export" / f"node-{outcome.final.node}" / INT8_FILE).exists()
    assert {n.node: (n.state, n.val_acc) for n in run_after.nodes.values()} == before
