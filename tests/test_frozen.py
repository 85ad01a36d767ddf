"""Frozen teachers: a torch.export program (.pt2) or a TorchScript archive given as --teacher teaches
and is never shrunk. Alone, generation 0 is the space's root VGG trained by KD from it and the budget
is measured against it; beside an imported VGG root it joins the root wherever the root teaches.
Tiny models on the smoke preset's 16-pixel synthetic data."""

import runpy
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from iterkd import compare, run_search, trainer
from iterkd.checkpoints import load_model
from iterkd.cli import main
from iterkd.errors import IterkdError
from iterkd.importers import FrozenTeacher, file_kind, load_frozen
from iterkd.models import VGG
from iterkd.report import write_report
from iterkd.run import open_run
from tests.conftest import he_fill, smoke_config
from tests.test_import import CifarVGG


class Residual(nn.Module):
    """Not a VGG: a skip connection iterkd cannot describe as a spec."""

    def __init__(self, channels=3, classes=10):
        super().__init__()
        self.a = nn.Conv2d(channels, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.fc((y + torch.relu(self.b(y))).mean((2, 3)))


def export(model: nn.Module, path: Path, *, dynamic=True, size=16, channels=3) -> Path:
    x = torch.randn(2, channels, size, size)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(model.eval(), (x,), dynamic_shapes=shapes), str(path))
    return path


def script(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still used
        torch.jit.script(model.eval()).save(str(path))
    return path


def spy_teachers(monkeypatch):
    """(calls, weights): each train() call of the search as (desc, [teacher kinds], hint teacher
    kind), and its teacher weights."""
    calls, weights, real = [], [], trainer.train

    def spy(model, data, settings, **kw):
        kinds = [type(t).__name__ for t in kw.get("teachers") or ()]
        hint = kw.get("hint_teacher")
        calls.append((kw.get("desc", ""), kinds, None if hint is None else type(hint).__name__))
        weights.append(kw.get("teacher_weights"))
        return real(model, data, settings, **kw)

    monkeypatch.setattr(trainer, "train", spy)
    return calls, weights


@pytest.mark.parametrize("fmt", ["exported", "torchscript"])
def test_a_frozen_program_alone_makes_generation_0_teaches_it_and_resumes(tmp_path, monkeypatch, capsys, fmt):
    torch.manual_seed(0)
    path = (export if fmt == "exported" else script)(Residual(), tmp_path / "resnet.pt2")
    assert file_kind(path) == fmt  # told by content: a TorchScript archive named .pt2 too
    calls, weights = spy_teachers(monkeypatch)
    cfg = smoke_config(tmp_path / "run", teacher=(str(path),), max_generations=1, teacher_weights="accuracy")
    out = run_search(cfg, progress=False)
    said = capsys.readouterr().out
    root = out.root
    (record,) = root.frozen
    assert root.operator == "kd:resnet.pt2" and root.generation == 0 and not root.parents
    # The root stands for its teacher: the reference for --max-drop is the teacher's accuracy.
    assert root.val_acc == record["val_acc"] and root.test_acc == record["test_acc"]
    assert root.vgg_val_acc is not None and root.spec == VGG(root.spec).spec
    assert record["params"] == sum(p.numel() for p in Residual().parameters())
    assert (Path(cfg.run_dir) / record["file"]).read_bytes() == path.read_bytes()  # copied into the run
    kind = "torch.export program" if fmt == "exported" else "TorchScript archive"
    assert f"teacher resnet.pt2: frozen {kind} resnet.pt2" in said
    assert "generation 0: " in said and "the reference for --max-drop" in said
    # Generation 0 learns from the program alone (no hint: it has no blocks); the child from its
    # parent with the program beside it (the root teaches through both); hints only from VGGs.
    assert calls[0][1:] == (["FrozenTeacher"], None)
    child = next(i for i, c in enumerate(calls) if c[0].startswith("gen 1"))
    assert calls[child][1] == ["VGG", "FrozenTeacher"] and calls[child][2] == "VGG"
    # --teacher-weights accuracy: each by its own validation accuracy, the VGG's not the teacher's
    assert weights[child] == [root.vgg_val_acc, record["val_acc"]]
    # The child's checkpoint is a VGG; nothing of the program was shrunk.
    assert isinstance(load_model(Path(cfg.run_dir) / out.final.checkpoint), VGG)
    write_report(cfg.run_dir)
    report = (Path(cfg.run_dir) / "report.md").read_text()
    assert "**frozen teachers**: resnet.pt2" in report and "Node 0 stands for them" in report
    trained = len(open_run(cfg.run_dir).nodes)
    path.unlink()  # moved away: a resume reads the root and the program's copy from the run
    again = run_search(cfg, progress=False)
    assert again.root.node == root.node and len(open_run(cfg.run_dir).nodes) == trained


def test_torchscript_and_pt2_teach_beside_an_imported_root_in_an_ancestors_variant(tmp_path, monkeypatch):
    net = he_fill(CifarVGG([8, 8, "M", 16, 16, "M", 16, "M"], classes=10))
    net.classifier = nn.Linear(16 * 4, 10)
    he_fill(net)
    torch.save(net.state_dict(), tmp_path / "mine.pth")
    torch.manual_seed(1)
    ts = script(Residual(), tmp_path / "other.pt")
    pt2 = export(Residual(), tmp_path / "third.pt2")
    assert file_kind(ts) == "torchscript"
    calls, _ = spy_teachers(monkeypatch)
    cfg = smoke_config(
        tmp_path / "run",
        teacher=(str(tmp_path / "mine.pth"), str(ts), str(pt2)),
        variant="ancestors-child",
        max_generations=2,
    )
    out = run_search(cfg, progress=False)
    assert out.root.operator == "teacher:mine.pth" and len(out.root.frozen) == 2
    assert out.root.vgg_val_acc is None  # the imported VGG is the reference, as without them
    gens = [c for c in calls if c[0].startswith("gen ")]
    assert gens and gens[-1][0].startswith("gen 2")
    for desc, kinds, hint in gens:
        # every ancestor (VGGs), then the root's two frozen teachers; the hint from the parent, a VGG
        generation = int(desc.split()[1])
        assert kinds == ["VGG"] * generation + ["FrozenTeacher"] * 2 and hint == "VGG"


def test_the_first_vgg_over_budget_stops_in_one_line_with_the_way_on(tmp_path, smoke_run, capsys):
    # A good teacher (the smoke run's root, exported) and a root VGG given a single epoch at a tiny
    # learning rate: far below it, over a budget of 0.5 points.
    cfg0, out0 = smoke_run
    root = load_model(Path(cfg0.run_dir) / out0.root.checkpoint)
    assert out0.root.val_acc > 40
    path = export(root, tmp_path / "teacher.pt2")
    run_dir = tmp_path / "run"
    argv = ["search", "--preset", "smoke", "--run-dir", str(run_dir), "--teacher", str(path)]
    argv += ["--root-epochs", "1", "--lr", "1e-5", "--max-drop", "0.5", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the first VGG" in err[0] and "over --max-drop 0.5" in err[0]
    assert "--width 0.125" in err[0]  # twice the smoke preset's 1/16
    run = open_run(run_dir)
    assert [n.generation for n in run.nodes.values()] == [0]  # generation 0 is kept, nothing after it
    assert main(argv) == 2  # a resume says the same, and trains nothing
    assert "the first VGG" in capsys.readouterr().err and len(open_run(run_dir).nodes) == 1


class Pair(nn.Module):
    def forward(self, x):
        m = x.mean((2, 3))
        return m, m


class FiveClasses(Residual):
    def __init__(self):
        super().__init__(classes=5)


class NaNs(Residual):
    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.fc.weight[0, 0] = float("nan")


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: export(Residual(), p, dynamic=False), "export it with a dynamic batch dimension"),
        (
            lambda p: export(FiveClasses(), p),
            "gives [1, 5] for a batch of 1, but a teacher gives [batch, classes] = [1, 10]",
        ),
        (lambda p: script(Pair(), p), "gives tuple for a batch of 1"),
        (lambda p: export(Residual(channels=1), p, channels=1), "fails on the data's input [1, 3, 16, 16]"),
        (lambda p: export(Residual(), p, size=32), "fails on the data's input [1, 3, 16, 16]"),
        (lambda p: export(NaNs(), p), "has NaN or infinite weights"),
    ],
    ids=["static-batch", "classes", "tuple", "channels", "size", "nan"],
)
def test_a_frozen_teacher_that_does_not_fit_is_one_line_before_anything_is_recorded(
    tmp_path, capsys, make, needle
):
    path = make(tmp_path / "model.pt2")
    run_dir = tmp_path / "run"
    code = main(
        ["search", "--preset", "smoke", "--run-dir", str(run_dir), "--teacher", str(path), "--no-progress"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not run_dir.exists()


def test_a_corrupt_program_is_one_line(tmp_path, capsys):
    good = export(Residual(), tmp_path / "good.pt2")
    path = tmp_path / "model.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():  # the same archive, its graph garbled
            dst.writestr(name, b"{not json" if name.endswith("models/model.json") else src.read(name))
    code = main(["search", "--preset", "smoke", "--run-dir", str(tmp_path / "run"), "--teacher", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "teacher" in err[0] and "corrupt" in err[0]


def test_teacher_normalize_maps_the_students_inputs_onto_the_teachers_own(tmp_path):
    class Means(nn.Module):  # its logits are its inputs' channel means: what it was given, exactly
        def forward(self, x):
            return x.mean((2, 3))

    path = export(Means(), tmp_path / "means.pt2")
    students = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    own = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    teacher = load_frozen(
        path, channels=3, size=16, classes=3, students=students, own=own, normalize="imagenet"
    )
    raw = torch.rand(4, 3, 16, 16)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in students)
    omean, ostd = (torch.tensor(v).view(1, 3, 1, 1) for v in own)
    got = teacher((raw - mean) / std)
    assert torch.allclose(got, ((raw - omean) / ostd).mean((2, 3)), atol=1e-5)
    assert isinstance(teacher, FrozenTeacher) and teacher.spec.normalize == "imagenet"
    same = load_frozen(path, channels=3, size=16, classes=3, students=students)
    assert torch.allclose(same((raw - mean) / std), ((raw - mean) / std).mean((2, 3)))
    cfg = smoke_config(tmp_path / "r", teacher_normalize="imagenet")
    assert cfg.frozen_inputs()[0] == own and smoke_config(tmp_path / "s").frozen_inputs() == (
        None,
        "students",
    )


def test_a_bad_teacher_normalize_is_one_line(capsys):
    code = main(
        ["search", "--preset", "smoke", "--run-dir", "/tmp/never-made", "--teacher-normalize", "0.5/0"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].count("--teacher-normalize") >= 1
    with pytest.raises(IterkdError, match="--teacher-normalize imagenet gives 3 channel"):
        smoke_config("/tmp/never-made", dataset="fashion-mnist", teacher_normalize="imagenet").frozen_inputs()


def test_compares_root_row_reports_the_frozen_teacher_and_it_teaches_the_baselines(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = export(Residual(), tmp_path / "resnet.pt2")
    cfg = smoke_config(tmp_path / "run", teacher=(str(path),), max_generations=1, epochs=1, root_epochs=1)
    run_search(cfg, progress=False)
    calls, real = [], compare.train

    def counting(model, data, settings, **kw):
        calls.append([type(t).__name__ for t in kw.get("teachers") or ()])
        return real(model, data, settings, **kw)

    monkeypatch.setattr(compare, "train", counting)
    c = compare.compare_run(cfg.run_dir, seeds=1, progress=False, log=lambda s: None)
    root_row = c.rows[0]
    assert root_row.method == "root: frozen resnet.pt2 (node 0)" and root_row.flops is None
    assert root_row.params == sum(p.numel() for p in Residual().parameters())
    assert "| root: frozen resnet.pt2 (node 0) |" in c.markdown_path.read_text()
    assert ["VGG", "FrozenTeacher"] in calls


def test_the_training_script_saves_what_users_bring_and_iterkd_reads_it(tmp_path):
    # scripts/train_torchvision.py, as a user runs it: a ResNet exported as a program is a frozen
    # teacher on the folder's input (its state-dict path is torch.save, read by test_import's files).
    from tests.test_folder import tree

    root = tree(tmp_path / "imgs", parts=("train", "val"), n=4, side=32)
    script_main = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "train_torchvision.py"))["main"]
    common = [
        "--data-dir",
        str(root),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--threads",
        "1",
    ]
    assert script_main([*common, "--arch", "resnet18", "--out", str(tmp_path / "r.pt2")]) == 0
    stats = ((0.5,) * 3, (0.25,) * 3)
    teacher = load_frozen(tmp_path / "r.pt2", channels=3, size=32, classes=3, students=stats)
    assert teacher.spec.kind == "exported" and teacher(torch.zeros(5, 3, 32, 32)).shape == (5, 3)
    # A state dict, then a second stage that goes on from it (--init, read weights_only): at a learning
    # rate of ~0 the second stage's weights are the first's, so it started from them, not afresh.
    first, second = tmp_path / "r.pth", tmp_path / "r2.pth"
    assert script_main([*common, "--arch", "resnet18", "--out", str(first)]) == 0
    assert (
        script_main(
            [*common, "--arch", "resnet18", "--init", str(first), "--lr", "1e-12", "--out", str(second)]
        )
        == 0
    )
    a, b = torch.load(first, weights_only=True), torch.load(second, weights_only=True)
    assert torch.allclose(a["conv1.weight"], b["conv1.weight"], atol=1e-9) and torch.allclose(
        a["fc.weight"], b["fc.weight"], atol=1e-9
    )
