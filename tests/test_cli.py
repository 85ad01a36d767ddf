"""The command line: bad input gives one line and a non-zero exit; good input runs."""
import subprocess
import sys

import pytest

from iterkd.arch import VGGSpec
from iterkd.checkpoints import save_checkpoint
from iterkd.cli import main
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


@pytest.mark.parametrize("argv, needle", [
    (["--space", "resnet_blocks"], "unknown search space"),
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--max-drop", "0"], "positive number"),
    (["--max-drop", "-1"], "positive number"),
    (["--max-drop", "nan"], "positive number"),
    (["--max-drop", "lots"], "expected a number"),
    (["--variant", "siblings"], "unknown variant"),
    (["--children", "0", "--variant", "parent-children"], "--children must be at least 1"),
    (["--children", "3"], "needs a *-children variant"),
    (["--preset", "huge"], "unknown preset"),
    (["--teacher", "no/such/file.safetensors"], "does not exist"),
    (["--storage", "not-a-url"], "not a database URL"),
    (["--alpha", "2"], "--alpha"),
])
def test_bad_search_flags_are_one_line_errors(tmp_path, capsys, argv, needle):
    code, _, err = run(capsys, "search", "--preset", "smoke", "--run-dir", str(tmp_path / "r"), *argv)
    one_line_error(code, err, needle)


def test_unreachable_storage_names_the_url_without_its_password(tmp_path, capsys):
    code, out, err = run(capsys, "search", "--preset", "smoke", "--run-dir", str(tmp_path / "r"),
                         "--storage", "postgresql://me:hunter2@127.0.0.1:1/iterkd")
    one_line_error(code, err, "cannot open storage", "me:***@127.0.0.1:1")
    assert "hunter2" not in out + err


def test_teacher_of_another_shape_or_not_a_checkpoint(tmp_path, capsys):
    wrong = save_checkpoint(tmp_path / "wrong.safetensors", VGG(VGGSpec(((4,),), in_channels=1, input_size=32)))
    code, _, err = run(capsys, "search", "--preset", "smoke", "--run-dir", str(tmp_path / "a"), "--teacher", str(wrong))
    one_line_error(code, err, "1-channel 32px", "synthetic has 3 channels")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    code, _, err = run(capsys, "search", "--preset", "smoke", "--run-dir", str(tmp_path / "b"), "--teacher", str(junk))
    one_line_error(code, err, "corrupt or not a safetensors file", str(junk))


def test_search_then_resume_with_a_conflicting_flag(tmp_path, capsys):
    run_dir = str(tmp_path / "r")
    code, out, _ = run(capsys, "search", "--preset", "smoke", "--run-dir", run_dir, "--max-generations", "1",
                       "--max-drop", "60", "--no-progress")
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
    proc = subprocess.run([sys.executable, "-m", "iterkd", "search", "--space", "nope", "--run-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown search space" in proc.stderr


@pytest.mark.parametrize("argv, needle", [
    (["--teacher-cache", "maybe"], "expected on or off"),
    (["--views", "0"], "--views must be at least 1"),
    (["--compile", "max"], "--compile must be one of"),
])
def test_bad_speed_flags_are_one_line_errors(tmp_path, capsys, argv, needle):
    code, _, err = run(capsys, "search", "--preset", "smoke", "--run-dir", str(tmp_path / "r"), *argv)
    one_line_error(code, err, needle)
