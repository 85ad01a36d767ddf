"""The command line: bad input gives one line and a non-zero exit; good input runs."""

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from iterkd import choices, config, variants
from iterkd.arch import VGGSpec
from iterkd.checkpoints import save_checkpoint
from iterkd.cli import main
from iterkd.device import COMPILE_MODES
from iterkd.inherit import INIT_MODES
from iterkd.losses import HINTS
from iterkd.models import VGG


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iterkd: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--space", "resnet_blocks"], "unknown search space"),
        (["--dataset", "imagenet"], "unknown --dataset 'imagenet'; choose one of fashion-mnist, mnist"),
        (["--max-drop", "0"], "--max-drop must be a number in (0, 100]"),
        (["--max-drop", "-1"], "--max-drop must be a number in (0, 100]"),
        (["--max-drop", "nan"], "--max-drop must be a number in (0, 100]"),
        (["--max-drop", "lots"], "expected a number"),
        (
            ["--variant", "siblings"],
            "unknown --variant 'siblings'; choose one of parent-child, parent-children",
        ),
        (["--children", "0", "--variant", "parent-children"], "--children must be at least 1"),
        (["--children", "3"], "needs a *-children variant"),
        (["--preset", "huge"], "unknown preset"),
        (["--teacher", "no/such/file.safetensors"], "does not exist"),
        (["--storage", "not-a-url"], "not a database URL"),
        (["--alpha", "2"], "--alpha"),
        (["--sampler", "cmaes"], "unknown --sampler 'cmaes'; choose one of greedy, tpe, random, nsga2"),
        (["--objectives", "params"], "unknown --objectives 'params'; choose one of acc, acc,params"),
    ],
)
def test_bad_search_flags_are_one_line_errors(tmp_path, capsys, argv, needle):
    code, _, err = run(capsys, "search", "--preset", "smoke", "--run-dir", str(tmp_path / "r"), *argv)
    one_line_error(code, err, needle)


def test_unreachable_storage_names_the_url_without_its_password(tmp_path, capsys):
    code, out, err = run(
        capsys,
        "search",
        "--preset",
        "smoke",
        "--run-dir",
        str(tmp_path / "r"),
        "--storage",
        "postgresql://me:hunter2@127.0.0.1:1/iterkd",
    )
    one_line_error(code, err, "cannot open storage", "me:***@127.0.0.1:1")
    assert "hunter2" not in out + err


def test_teacher_of_another_shape_or_not_a_checkpoint(tmp_path, capsys):
    wrong = save_checkpoint(
        tmp_path / "wrong.safetensors", VGG(VGGSpec(((4,),), in_channels=1, input_size=32))
    )
    code, _, err = run(
        capsys, "search", "--preset", "smoke", "--run-dir", str(tmp_path / "a"), "--teacher", str(wrong)
    )
    one_line_error(code, err, "1-channel 32px", "synthetic has 3 channels")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    code, _, err = run(
        capsys, "search", "--preset", "smoke", "--run-dir", str(tmp_path / "b"), "--teacher", str(junk)
    )
    one_line_error(code, err, "neither a safetensors file nor a torch.save file", str(junk))


def test_search_then_resume_with_a_conflicting_flag(tmp_path, capsys):
    run_dir = str(tmp_path / "r")
    code, out, _ = run(
        capsys,
        "search",
        "--preset",
        "smoke",
        "--run-dir",
        run_dir,
        "--max-generations",
        "1",
        "--max-drop",
        "60",
        "--no-progress",
    )
    assert code == 0
    assert "stopped: reached --max-generations 1" in out and "final model: node 1" in out
    assert "lineage:" in out and (tmp_path / "r" / "lineage.csv").exists()
    code, _, err = run(capsys, "search", "--run-dir", run_dir, "--epochs", "9")
    one_line_error(code, err, "--epochs 9 (run has 4)", "--name")
    code, out, _ = run(capsys, "search", "--run-dir", run_dir, "--no-progress")
    assert code == 0 and "resuming" in out and "gen 1: reusing" not in out  # finished: nothing to redo


def test_spaces_lists_every_shipped_space_with_its_root_size(capsys):
    code, out, _ = run(capsys, "spaces")
    assert code == 0 and "vgg16_blocks" in out and "14,728,266 params" in out and "vgg19_widths" in out


def test_module_entry_point_exits_non_zero_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "iterkd", "search", "--space", "nope", "--run-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown search space" in proc.stderr


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--teacher-cache", "maybe"], "expected on or off"),
        (["--views", "0"], "--views must be at least 1"),
        (["--compile", "max"], "unknown --compile 'max'; choose one of auto, off, default, reduce-overhead"),
    ],
)
def test_bad_speed_flags_are_one_line_errors(tmp_path, capsys, argv, needle):
    code, _, err = run(capsys, "search", "--preset", "smoke", "--run-dir", str(tmp_path / "r"), *argv)
    one_line_error(code, err, needle)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
        (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1"),
        (["--hint-weight", "inf"], "--hint-weight must be a finite number >= 0, got inf"),
        (["--test-subset", "-5"], "--test-subset must be at least 1, got -5"),
        (["--train-subset", "0"], "--train-subset must be at least 1, got 0"),
        (["--seed", str(2**40)], "--seed must be between 0 and 2147483647, got 1099511627776"),
        (["--seed", "-1"], "--seed must be between 0 and 2147483647, got -1"),
        (["--alpha", "-0.1"], "--alpha must be a number in [0, 1], got -0.1"),
        (["--alpha", "1.5"], "--alpha must be a number in [0, 1], got 1.5"),
        (["--temperature", "0"], "--temperature must be a finite positive number, got 0"),
        (["--temperature", "inf"], "--temperature must be a finite positive number, got inf"),
        (["--lr", "-0.1"], "--lr must be a finite positive number, got -0.1"),
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--root-epochs", "0"], "--root-epochs must be at least 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--val-size", "-1"], "--val-size must be a finite positive number, got -1"),
        (["--views", "0"], "--views must be at least 1, got 0"),
        (["--children", "0", "--variant", "parent-children"], "--children must be at least 1, got 0"),
        (["--beam", "0"], "--beam must be at least 1, got 0"),
        (["--max-generations", "0"], "--max-generations must be at least 1, got 0"),
        (["--workers", "-1"], "--workers must be at least 0, got -1"),
        (["--width", "0"], "--width must be a finite positive number, got 0"),
        (["--width", "1/0"], "argument --width: expected a number (or a fraction such as 1/8), got '1/0'"),
        (["--max-drop", "101"], "--max-drop must be a number in (0, 100], got 101"),
        (["--name", "."], "--name must be a plain directory name"),
        (["--name", ".."], "--name must be a plain directory name"),
        (["--name", "a/b"], "--name must be a plain directory name"),
    ],
)
def test_out_of_range_settings_are_one_line_errors_that_create_nothing(
    tmp_path, monkeypatch, capsys, argv, needle
):
    monkeypatch.chdir(tmp_path)  # the run would be runs/NAME here ('..': tmp_path itself)
    code, _, err = run(capsys, "search", "--preset", "smoke", *argv)
    assert code == 2
    one_line_error(code, err, needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["bench", "--threads", "-1"], "argument --threads: must be at least 1, got -1"),
        (["bench", "--threads", "0"], "argument --threads: must be at least 1, got 0"),
        (["dashboard", "RUN", "--port", "70000"], "argument --port: must be between 1 and 65535, got 70000"),
        (["dashboard", "RUN", "--port", "-1"], "argument --port: must be between 1 and 65535, got -1"),
        (["dashboard", "RUN", "--port", "http"], "argument --port: expected an integer, got 'http'"),
        (["export", "RUN", "--threads", "0"], "argument --threads: must be at least 1, got 0"),
    ],
)
def test_bad_numbers_for_other_commands_are_one_line_errors(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2
    one_line_error(code, err, needle)
    assert list(tmp_path.iterdir()) == []


def search_help(capsys, monkeypatch) -> dict[str, str]:
    """`iterkd search --help` as {flag: its entry on one line} (a wide terminal keeps names unbroken)."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--help"])
    assert exit_.value.code == 0
    entries, current = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  --"):
            current = line.split()[0]
            entries[current] = line.strip()
        elif line.startswith("   ") and current:  # a help text continued under its flag
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_search_help_shows_each_presets_value_and_the_registered_names(capsys, monkeypatch):
    help_ = search_help(capsys, monkeypatch)
    assert help_["--epochs"].endswith("epochs per child (smoke 4, quick 8, full 30)")
    assert help_["--root-epochs"].endswith("(smoke 3, quick 5, full 30)")
    assert help_["--lr"].endswith("(smoke 0.05, quick 0.05, full 0.2)")
    assert help_["--alpha"].endswith("(default: 0.9)")
    assert help_["--hint-weight"].endswith("(default: 1 for fitnet, 3000 for sp, 0 for none)")
    assert help_["--teacher-cache"].startswith("--teacher-cache on|off")
    assert help_["--teacher-cache"].endswith("(default: on)")
    for flag, names in [
        ("--variant", variants.VARIANTS),
        ("--sampler", choices.SAMPLERS),
        ("--pruner", choices.PRUNERS),
        ("--hint", HINTS),
        ("--compile", COMPILE_MODES),
        ("--init", INIT_MODES),
    ]:
        assert f"one of {', '.join(names)} (default: " in help_[flag]
    # every setting has its flag, and nothing else (but --no-progress) is offered
    assert set(help_) == {config.flag(name) for name in config.SETTINGS} | {"--no-progress"}


def test_a_newly_registered_sampler_is_a_valid_flag_value_with_no_other_change(tmp_path, capsys, monkeypatch):
    class Sobol(choices.optuna.samplers.RandomSampler):
        pass

    monkeypatch.setitem(choices.SAMPLERS, "sobol", lambda seed: Sobol(seed=seed))
    assert "one of greedy, tpe, random, nsga2, sobol" in search_help(capsys, monkeypatch)["--sampler"]
    cfg = config.build_config("smoke", {"sampler": "sobol", "run_dir": str(tmp_path)})
    assert isinstance(choices.make_sampler(cfg.sampler, cfg.seed), Sobol)


def test_the_switch_flags_keep_their_spelling(tmp_path, monkeypatch):
    from iterkd.cli import build_parser, config_from_args

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(
        [
            "search",
            "--preset",
            "smoke",
            "--no-download",
            "--no-deploy-figures",
            "--teacher-cache",
            "off",
            "--width",
            "1/8",
            "--no-progress",
        ]
    )
    cfg, resumed = config_from_args(args)
    assert not resumed and args.no_progress
    assert (cfg.download, cfg.deploy_figures, cfg.teacher_cache, cfg.width) == (False, False, False, 0.125)
    cfg, _ = config_from_args(build_parser().parse_args(["search", "--preset", "smoke"]))
    assert (cfg.download, cfg.teacher_cache) == (True, True)


def test_the_flag_reference_in_docs_usage_md_is_the_one_the_fields_define():
    docs = Path(__file__).resolve().parent.parent / "docs"
    table = runpy.run_path(str(docs / "flags.py"))["table"]()
    assert "| `--epochs N` | smoke 4, quick 8, full 30 | epochs per child |" in table
    assert table in (docs / "usage.md").read_text(), "the flags changed: run python docs/flags.py"
