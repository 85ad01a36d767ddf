import pickle

import pytest
import torch

from iterkd.arch import VGGSpec
from iterkd.checkpoints import load_model, read_checkpoint, save_checkpoint
from iterkd.errors import IterkdError
from iterkd.models import VGG

SPEC = VGGSpec(((4, 4), (8,)), in_channels=1, num_classes=3, input_size=8)


def test_round_trip_keeps_weights_spec_and_metadata(tmp_path):
    model = VGG(SPEC)
    path = save_checkpoint(tmp_path / "n.safetensors", model, node=3, val_acc=91.5)
    again = load_model(path)
    assert again.spec == SPEC
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model.eval()(x), again(x))
    assert read_checkpoint(path)[2] == {"node": 3, "val_acc": 91.5}
    assert [p.name for p in tmp_path.iterdir()] == ["n.safetensors"]  # no temp file left behind


def test_truncated_or_foreign_files_are_refused_with_their_path(tmp_path):
    good = save_checkpoint(tmp_path / "good.safetensors", VGG(SPEC))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:200])
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    for path in (cut, text, tmp_path / "missing.safetensors"):
        with pytest.raises(IterkdError, match=str(path)):
            load_model(path)


def test_a_malicious_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(IterkdError):
        load_model(path)
    assert not marker.exists()


def test_weights_that_do_not_fit_the_spec_are_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "odd.safetensors"
    save_file(
        {"head.weight": torch.zeros(3, 8)},
        str(path),
        metadata={"format": "iterkd-checkpoint-1", "spec": SPEC.to_json()},
    )
    with pytest.raises(IterkdError, match="do not match"):
        load_model(path)


def _file_with_metadata(path, **metadata):
    from safetensors.torch import save_file

    save_file(
        {"head.weight": torch.zeros(3, 8)}, str(path), metadata={"format": "iterkd-checkpoint-1", **metadata}
    )
    return path


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"spec": "{blocks: [[4]]"}, "metadata 'spec' is an invalid VGG spec: not JSON"),
        ({"spec": '{"in_channels": 1}'}, "no 'blocks'"),
        ({"spec": '{"blocks": [[4]], "activation": "gelu"}'}, "unknown key 'activation'"),
        ({"spec": '{"blocks": [["4"]]}'}, "blocks must be"),
        ({"spec": '{"blocks": [[1000000], [1000000], [1000000]]}'}, "parameters, more than the 2e+09"),
        ({"spec": SPEC.to_json(), "val_acc": "ninety"}, "metadata 'val_acc' is not JSON"),
    ],
)
def test_hostile_metadata_is_one_line_naming_the_file(tmp_path, monkeypatch, metadata, message):
    monkeypatch.setattr("iterkd.checkpoints.VGG", None)  # building a model would be a TypeError
    path = _file_with_metadata(tmp_path / "t.safetensors", **metadata)
    with pytest.raises(IterkdError) as e:
        load_model(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_spec_its_tensors_do_not_fill_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr("iterkd.checkpoints.VGG", None)  # 2e9 params: building it would take 8 GB
    huge = VGGSpec(((14_900,), (14_900,)), in_channels=1)
    path = _file_with_metadata(tmp_path / "t.safetensors", spec=huge.to_json())
    with pytest.raises(IterkdError, match="24 values stored, 1998"):
        load_model(path)
