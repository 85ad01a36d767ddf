"""Exporting a smoke run's node: every format written, verified and loaded back; deployment figures
per node; mistakes give one line and a non-zero exit."""

import json
import shutil

import pandas as pd
import pytest
import torch

import iterkd
from iterkd.checkpoints import load_model
from iterkd.errors import IterkdError
from iterkd.export import FILES, load, onnx_session, validation_batch
from iterkd.lineage import DEPLOY_COLUMNS
from iterkd.run import open_run
from iterkd.storage import open_study
from tests.test_cli import one_line_error, run


def test_export_all_formats_verified_reloaded_with_bench_and_card(smoke_run, tmp_path, capsys):
    cfg, outcome = smoke_run
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "export", cfg.run_dir, "--format", "all", "-o", str(out), "--bench")
    assert code == 0
    final = outcome.final
    assert f"exported node {final.node}" in stdout
    assert (
        f"root (node {outcome.root.node})" in stdout and f"node {final.node}" in stdout
    )  # --bench, side by side
    assert "PyTorch latency batch 1 (ms)" in stdout and "onnxruntime throughput batch 64" in stdout
    assert "CPU threads: 1" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES.values(), "spec.json", "MODEL_CARD.md"])

    reference = load_model(f"{cfg.run_dir}/{final.checkpoint}")
    x = validation_batch(cfg)
    with torch.inference_mode():
        expected = reference(x)
        for model in (iterkd.load(out), load(out / FILES["torchscript"]), load(out / FILES["safetensors"])):
            assert (model(x) - expected).abs().max() <= 1e-4
        logits = onnx_session(out / FILES["onnx"]).run(None, {"input": x[:1].numpy()})[0]  # batch is dynamic
        assert (torch.from_numpy(logits) - expected[:1]).abs().max() <= 1e-4
    assert iterkd.load(out).spec == final.spec

    spec = json.loads((out / "spec.json").read_text())
    assert spec["node"] == final.node and iterkd.VGGSpec.from_json(spec["architecture"]) == final.spec
    assert spec["verification"]["images"] == 64 and max(spec["verification"]["max_abs_diff"].values()) <= 1e-4
    card = (out / "MODEL_CARD.md").read_text()
    for n in (outcome.root, *[m for m in open_run(cfg.run_dir).nodes.values() if m.generation]):
        assert f"| {n.node} | {n.generation} | {n.operator} |" in card  # the lineage path, root to node
    assert (
        "mean (0.5, 0.5, 0.5), std (0.25, 0.25, 0.25)" in card and "## Measured at export (`--bench`)" in card
    )
    assert "iterkd search --name smoke --preset smoke" in card and "--max-drop 60.0" in card
    df = pd.read_csv(f"{cfg.run_dir}/lineage.csv").set_index("node")
    figures = df.loc[final.node, DEPLOY_COLUMNS]
    assert (
        f"| this (node {final.node}) | {figures.latency_ms_b1} | {figures.throughput_b64} | 1 | "
        f"{int(figures.onnx_bytes)} |"
    ) in card  # recorded during the search


def test_a_file_that_computes_something_else_is_an_error(smoke_run, tmp_path, capsys, monkeypatch):
    import iterkd.export as export

    real = export.write_torchscript

    def off_by_a_little(model, path):
        with torch.no_grad():
            model.head.bias.add_(1e-3)  # 10x the tolerance
        return real(model, path)

    monkeypatch.setattr(export, "write_torchscript", off_by_a_little)
    cfg, _ = smoke_run
    out = tmp_path / "o"
    out.mkdir()
    (out / "MODEL_CARD.md").write_text("from an earlier, verified export")
    (out / FILES["torchscript"]).write_bytes(b"the earlier, verified file")
    code, _, err = run(capsys, "export", cfg.run_dir, "--format", "torchscript", "-o", str(out))
    one_line_error(
        code, err, "verification failed", "model.torchscript.pt differs by 0.001", "nothing was exported"
    )
    # the unverified file never replaced the earlier export, whose card still vouches for its own files
    assert (out / FILES["torchscript"]).read_bytes() == b"the earlier, verified file"
    assert (out / "MODEL_CARD.md").read_text() == "from an earlier, verified export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no staging directory left behind


@pytest.fixture
def run_with_a_failed_node(smoke_run, tmp_path):
    """A copy of the smoke run with one extra failed trial (the shared run stays untouched)."""
    cfg, outcome = smoke_run
    copy = tmp_path / "copy"
    shutil.copytree(cfg.run_dir, copy)
    study = open_study(f"sqlite:///{copy}/study.db", cfg.name, create=False)
    trial = study.ask()
    for k, v in study.trials[outcome.final.node].user_attrs.items():
        if k not in ("checkpoint", "val_acc", "test_acc"):
            trial.set_user_attr(k, v)
    study.tell(trial, state=__import__("optuna").trial.TrialState.FAIL)
    return copy, trial.number


def test_export_mistakes_are_one_line_errors(run_with_a_failed_node, tmp_path, capsys):
    run_dir, failed = run_with_a_failed_node
    (tmp_path / "empty").mkdir()
    for argv, needles in [
        ([str(tmp_path / "nope")], ["no run at", "does not exist"]),
        ([str(tmp_path / "empty")], ["not an iterkd run"]),
        ([str(run_dir), "--node", "99"], ["has no node 99", "trained nodes are 0, 1, 2"]),
        ([str(run_dir), "--node", str(failed)], [f"node {failed}", "is failed and has no checkpoint"]),
        ([str(run_dir), "--format", "tflite"], ["unknown --format 'tflite'"]),
    ]:
        code, _, err = run(capsys, "export", *argv, "-o", str(tmp_path / "o"))
        one_line_error(code, err, *needles)


def test_load_accepts_checkpoints_and_refuses_what_it_cannot_rebuild(smoke_run, tmp_path):
    cfg, outcome = smoke_run
    model = iterkd.load(f"{cfg.run_dir}/{outcome.root.checkpoint}")
    assert model.spec == outcome.root.spec and not model.training
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    for path, needle in [
        (tmp_path / "m.onnx", "onnxruntime"),
        (tmp_path / "junk.pt", "not a TorchScript file"),
        (tmp_path, "holds neither"),
    ]:
        with pytest.raises(IterkdError, match=needle):
            iterkd.load(path)


def test_the_search_records_deployment_figures_per_node(smoke_run):
    cfg, _ = smoke_run
    df = pd.read_csv(f"{cfg.run_dir}/lineage.csv")
    assert (
        list(df.columns[-len(DEPLOY_COLUMNS) :]) == DEPLOY_COLUMNS and df[DEPLOY_COLUMNS].notna().all().all()
    )
    assert (df.cpu_threads == 1).all() and (df.latency_ms_b1 > 0).all() and (df.throughput_b64 > 0).all()
    assert (df.onnx_bytes > 4 * df.params).all()  # fp32 weights plus the graph
