"""SearchConfig: the reproduce command a model card prints must rebuild the run's config exactly;
a resume may change only what does not change a node; the loss weights and data a config names."""

import shlex

import pytest
import torch

from iterkd.cli import build_parser, config_from_args
from iterkd.config import RESUMABLE_OVERRIDES, build_config, resume_config, search_command
from iterkd.data import load_data
from iterkd.errors import IterkdError
from iterkd.losses import LossWeights


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("quick", {"name": "quick1"}),
        (
            "smoke",
            {
                "name": "s",
                "max_drop": 60.0,
                "width": 1 / 3,
                "teacher": "dir with space/t.safetensors",
                "variant": "ancestors-children",
                "children": 3,
                "train_subset": 500,
                "alpha": 0.5,
            },
        ),
        (
            "smoke",
            {"name": "e", "teacher": ("a.safetensors", "b.safetensors"), "hint": "sp", "init": "scratch"},
        ),
        (
            "quick",
            {
                "name": "f",
                "teacher_cache": False,
                "compile": "off",
                "seed": 7,
                "weight_decay": 1e-4,
                "test_subset": 100,
                "sampler": "tpe",
                "pruner": "median",
                "beam": 2,
            },
        ),
    ],
)
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


@pytest.mark.parametrize(
    "hint, given, expected",
    [("fitnet", None, 1.0), ("sp", None, 3000.0), ("sp", 10.0, 10.0), ("none", None, 0.0)],
)
def test_the_hint_weight_defaults_to_the_scale_of_its_hint(hint, given, expected):
    assert build_config("smoke", {"hint": hint, "hint_weight": given}).hint_weight == expected


def test_a_resume_may_change_only_what_does_not_change_a_node():
    assert RESUMABLE_OVERRIDES == {
        "device",
        "data_dir",
        "download",
        "max_generations",
        "time_budget",  # a limit on this session's wall time, like --max-generations
        "final_epochs",  # another length is another polish node (its key names the epochs)
        "final",  # int8 is an export of the final node, not a node
        "storage",
        "teacher_cache",
        "cache_mb",  # like --teacher-cache: cached or live hint features differ by fp16 rounding only
        "compile",
        "deploy_figures",
        "workers",
    }
    saved = build_config("smoke", {"name": "r"})
    again = resume_config(
        saved, {"max_generations": 5, "compile": "off", "teacher_cache": False, "epochs": 4}
    )
    assert (again.max_generations, again.compile, again.teacher_cache, again.epochs) == (5, "off", False, 4)
    with pytest.raises(IterkdError, match=r"--epochs 9 \(run has 4\); --init scratch \(run has inherit\)"):
        resume_config(saved, {"epochs": 9, "init": "scratch"})
    with pytest.raises(IterkdError, match="--max-generations must be at least 1, got 0"):
        resume_config(saved, {"max_generations": 0})


def test_loss_weights_are_the_configs_with_the_hints_default_weight():
    cfg = build_config("smoke", {"alpha": 0.5, "temperature": 2.0, "hint": "sp"})
    assert cfg.loss_weights() == LossWeights(0.5, 2.0, 3000.0, "sp")
    assert build_config("smoke", {"hint_weight": 0.25}).loss_weights() == LossWeights(
        0.9, 4.0, 0.25, "fitnet"
    )


def test_load_data_gives_the_split_the_config_names():
    cfg = build_config("smoke", {"val_size": 300, "train_subset": 500, "test_subset": 70, "seed": 3})
    data = cfg.load_data()
    assert (len(data.train_x), len(data.val_x), len(data.test_x)) == (500, 300, 70)
    same = load_data("synthetic", val_size=300, train_subset=500, test_subset=70, seed=3)
    assert torch.equal(data.val_y, same.val_y) and torch.equal(data.train_x[:], same.train_x[:])
    other_seed = build_config("smoke", {"val_size": 300, "seed": 4}).load_data()
    assert not torch.equal(data.val_x[:], other_seed.val_x[:])  # the seed draws the validation split
    on_meta = cfg.load_data(
        torch.device("meta")
    )  # moved when a device is given (meta: no copy, no GPU needed)
    assert on_meta.train_x.device.type == "meta" and on_meta.train_x.shape == data.train_x.shape
