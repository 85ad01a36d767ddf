import torch

from iterkd.arch import VGGSpec, vgg_spec
from iterkd.models import VGG, HintRegressor, hint_blocks


def test_forward_features_returns_logits_and_each_block_output():
    spec = vgg_spec("vgg16", 1 / 16, in_channels=1, num_classes=10, input_size=32)
    logits, feats = VGG(spec).forward_features(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 10)
    assert [(f.shape[1], f.shape[2]) for f in feats] == spec.block_output_shapes()


def test_hint_pairs_middle_student_block_with_teacher_block_at_same_relative_depth():
    teacher = vgg_spec("vgg16", 1 / 8)
    assert hint_blocks(teacher, teacher) == (2, 2)
    three = VGGSpec(((8,), (16,), (16,)))
    assert hint_blocks(three, teacher) == (1, 2)  # 2/3 of the way down both
    assert hint_blocks(VGGSpec(((8,),)), teacher) == (0, 4)


def test_regressor_maps_student_features_to_teacher_shape():
    reg = HintRegressor(8, 32)
    out = reg(torch.randn(4, 8, 4, 4), (8, 8))
    assert out.shape == (4, 32, 8, 8)
    assert reg(torch.randn(4, 8, 8, 8), (8, 8)).shape == (4, 32, 8, 8)


def test_block_output_equals_that_block_of_the_full_forward():
    torch.manual_seed(0)
    model = VGG(vgg_spec("vgg11", 1 / 16, in_channels=1)).eval()
    x = torch.randn(3, 1, 32, 32)
    _, feats = model.forward_features(x)
    for block in range(len(feats)):
        assert torch.allclose(model.block_output(x, block), feats[block])
