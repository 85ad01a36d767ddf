"""The reproduce command a model card prints must rebuild the run's config exactly."""
import shlex

import pytest

from iterkd.cli import build_parser, config_from_args
from iterkd.config import build_config, search_command


@pytest.mark.parametrize("preset, overrides", [
    ("quick", {"name": "quick1"}),
    ("smoke", {"name": "s", "max_drop": 60.0, "width": 1 / 3, "teacher": "dir with space/t.safetensors",
               "variant": "ancestors-children", "children": 3, "train_subset": 500, "alpha": 0.5}),
    ("smoke", {"name": "e", "teacher": ("a.safetensors", "b.safetensors"), "hint": "sp", "init": "scratch"}),
])
def test_search_command_rebuilds_the_same_config(tmp_path, monkeypatch, preset, overrides):
    monkeypatch.chdir(tmp_path)  # runs/NAME is resolved against the cwd: never find a real run
    cfg = build_config(preset, overrides)
    argv = shlex.split(search_command(cfg))
    assert argv[:2] == ["iterkd", "search"]
    args = build_parser().parse_args(argv[1:])
    (tmp_path / "t.safetensors").touch()
    if cfg.teacher:  # the CLI checks the teacher files exist; point them at one, then compare the rest
        assert len(args.teacher) == len(cfg.teacher)
        args.teacher = [str(tmp_path / "t.safetensors")] * len(cfg.teacher)
    again, resumed = config_from_args(args)
    assert not resumed
    assert again == cfg.__class__(**{**cfg.__dict__, "teacher": tuple(args.teacher) if cfg.teacher else None})


@pytest.mark.parametrize("hint, given, expected", [("fitnet", None, 1.0), ("sp", None, 3000.0), ("sp", 10.0, 10.0),
                                                   ("none", None, 0.0)])
def test_the_hint_weight_defaults_to_the_scale_of_its_hint(hint, given, expected):
    assert build_config("smoke", {"hint": hint, "hint_weight": given}).hint_weight == expected
