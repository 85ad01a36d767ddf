"""Teacher cache: lookups equal the teacher's live outputs on the student's very inputs, training
with it gives the live-teacher losses, files are reused, and hits are counted honestly."""

import pytest
import torch

from iterkd import device
from iterkd.arch import VGGSpec
from iterkd.cache import TeacherCache, weights_fingerprint
from iterkd.data import DATASETS, DataSplits, train_batches, view_batches
from iterkd.losses import LossWeights, hint_kind
from iterkd.models import VGG, HintRegressor, hint_blocks
from iterkd.train import TrainSettings, train

TEACHER = VGGSpec(((8,), (16,), (16,)), in_channels=1, num_classes=10, input_size=16)
STUDENT = VGGSpec(((4,), (8,)), in_channels=1, num_classes=10, input_size=16)


def random_splits(n: int = 96, seed: int = 0) -> DataSplits:
    """Random 16px one-channel images with a dataset that flips, so crops and flips both vary."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n + 16, 1, 16, 16), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n + 16,), generator=g)
    return DataSplits(DATASETS["fashion-mnist"], x[:n], y[:n], x[n:], y[n:], x[n:], y[n:])


def teacher(seed: int = 1) -> VGG:
    """A confident teacher: logits of tens, as a trained one gives, so its soft labels change with
    the crop and flip (at random init they hardly depend on the input, and a wrong view would pass)."""
    torch.manual_seed(seed)
    model = VGG(TEACHER).eval()
    with torch.no_grad():
        model.head.weight.mul_(50)
    return model


def test_lookups_are_the_teachers_outputs_on_the_students_inputs_to_fp16():
    data, t = random_splits(), teacher()
    cache = TeacherCache(t, data, seed=7, views=2, batch_size=40)  # batches unlike the student's
    for epoch in range(3):
        cache.ensure_view(epoch % 2)
        for idx, x, _ in train_batches(data, 32, epoch, seed=3, views=2, augment_seed=7):
            cached = cache.logits(idx, epoch % 2)
            assert cached.dtype == torch.float16
            with torch.no_grad():
                assert torch.allclose(cached.float(), t(x), rtol=4.9e-4, atol=1e-4)


def settings(**kw) -> TrainSettings:
    values = dict(
        epochs=1,
        batch_size=32,
        lr=0.05,
        seed=5,
        views=2,
        augment_seed=7,
        loss=LossWeights(alpha=0.9, temperature=4.0, hint_weight=1.0),
    )
    values.update(kw)
    return TrainSettings(**values)


def train_student(data, s, t, cache=()):
    torch.manual_seed(0)
    student = VGG(STUDENT)
    return train(student, data, s, teachers=[t], hint_teacher=t, teacher_cache=cache, progress=False)


def test_cached_and_live_teachers_give_the_same_losses():
    t = teacher()
    one_batch = random_splits(n=32)  # one step: the loss of the very same batch, before any update
    live = train_student(one_batch, settings(), t)
    cached = train_student(one_batch, settings(), t, [TeacherCache(t, one_batch, seed=7, views=2)])
    # fp16 keeps 11 significant bits (relative 4.9e-4); a cache of the wrong views is ~1e-2 off.
    assert cached.losses[0] == pytest.approx(live.losses[0], rel=4.9e-4)

    data = random_splits(n=64)  # two epochs of two steps, one per view, hint included
    live = train_student(data, settings(epochs=2), t)
    cached = train_student(data, settings(epochs=2), t, [TeacherCache(t, data, seed=7, views=2)])
    assert cached.losses == pytest.approx(live.losses, rel=4.9e-4)
    assert live.cache_hit_rate is None and cached.cache_hit_rate is not None


def test_a_view_is_a_miss_the_first_time_and_a_hit_afterwards_including_for_siblings():
    data, t = random_splits(n=64), teacher()
    cache = TeacherCache(t, data, seed=7, views=2)
    first = train_student(data, settings(epochs=3), t, [cache])
    assert first.cache_hit_rate == pytest.approx(
        1 / 3
    )  # epochs 0 and 1 fill views 0 and 1; epoch 2 reuses view 0
    sibling = train_student(data, settings(epochs=3), t, [cache])
    assert sibling.cache_hit_rate == 1.0
    # Each step looks up the logits and the hint teacher's block output: both are counted.
    assert cache.counts() == (2 * 6 * 64, 2 * 2 * 64)


def test_a_cache_file_is_reused_by_a_new_process_and_ignored_when_stale(tmp_path):
    data, t = random_splits(), teacher()
    first = TeacherCache(t, data, seed=7, views=2, directory=tmp_path, node=3)
    assert first.loaded_views == [] and first.ensure_view(1) and first.ensure_view(0)
    assert [p.name for p in tmp_path.iterdir()] == ["node-3-seed-7-views-2-n-96.safetensors"]

    class Refuses(VGG):
        def forward(self, x):
            raise AssertionError("the teacher ran although its outputs were on disk")

    silent = Refuses(TEACHER)
    silent.load_state_dict(t.state_dict())
    again = TeacherCache(silent, data, seed=7, views=2, directory=tmp_path, node=3)
    assert again.loaded_views == [0, 1] and not again.ensure_view(0)
    idx = torch.arange(96)
    assert torch.equal(again.logits(idx, 1), first.logits(idx, 1))
    assert again.counts() == (96, 0)  # outputs from an earlier run are hits

    other_data = random_splits(seed=1)  # same size, other samples: the file must not be reused
    assert TeacherCache(t, other_data, seed=7, views=2, directory=tmp_path, node=3).loaded_views == []
    (tmp_path / "node-3-seed-7-views-2-n-96.safetensors").write_bytes(b"truncated")
    assert TeacherCache(t, data, seed=7, views=2, directory=tmp_path, node=3).loaded_views == []


def test_another_teacher_with_the_same_node_id_and_spec_never_gets_the_files_logits(tmp_path):
    """A run directory reused by another study: node 3 is a different model there."""
    data, a, b = random_splits(), teacher(seed=1), teacher(seed=2)
    idx = torch.arange(96)
    first = TeacherCache(a, data, seed=7, views=1, directory=tmp_path, node=3)
    first.ensure_view(0)
    with torch.no_grad():
        a_out, b_out = a(data_view(data)), b(data_view(data))
    assert (a_out - b_out).abs().max() > 1  # a stale hit would be far off

    stale = TeacherCache(b, data, seed=7, views=1, directory=tmp_path, node=3)
    assert stale.weights != first.weights and stale.loaded_views == [] and stale.ensure_view(0)
    assert torch.allclose(stale.logits(idx, 0).float(), b_out, rtol=4.9e-4, atol=1e-4)
    assert stale.counts() == (96, 96)  # computed here, so first uses are misses

    reopened = TeacherCache(b, data, seed=7, views=1, directory=tmp_path, node=3)  # b's file is now reused
    assert reopened.loaded_views == [0] and torch.equal(reopened.logits(idx, 0), stale.logits(idx, 0))
    assert reopened.counts() == (96, 0)
    assert TeacherCache(a, data, seed=7, views=1, directory=tmp_path, node=3).loaded_views == []


def data_view(data: DataSplits) -> torch.Tensor:
    """View 0 of every training sample in index order, as a student sees it with augment_seed 7."""
    return torch.cat([x for _, x in view_batches(data, 7, 0)])


def test_the_weights_fingerprint_is_of_the_values_not_the_object():
    a = teacher(seed=1)
    copy = VGG(TEACHER)
    copy.load_state_dict(a.state_dict())
    assert weights_fingerprint(copy) == weights_fingerprint(a) and len(weights_fingerprint(a)) == 16
    with torch.no_grad():
        copy.blocks[0][0].weight[0, 0, 0, 0] += 1e-3
    assert weights_fingerprint(copy) != weights_fingerprint(a)
    with torch.no_grad():
        copy.blocks[0][0].weight[0, 0, 0, 0] -= 1e-3
        copy.head.bias.data = (
            copy.head.bias.data.bfloat16()
        )  # same numbers rounded: other bytes, other teacher
    assert weights_fingerprint(copy) != weights_fingerprint(a)


def test_a_cache_for_other_views_or_seed_is_refused_by_train():
    data, t = random_splits(), teacher()
    for cache in (TeacherCache(t, data, seed=8, views=2), TeacherCache(t, data, seed=7, views=3)):
        with pytest.raises(ValueError, match="augment_seed and views"):
            train_student(data, settings(), t, [cache])


# -- the hint teacher's block outputs ---------------------------------------------------------------
BLOCK = hint_blocks(STUDENT, TEACHER)[1]  # the teacher block a STUDENT's hint is regressed onto


class Refuses(VGG):
    """A teacher with the given weights that fails the test if any of its blocks runs."""

    def __init__(self, weights: VGG):
        super().__init__(weights.spec)
        self.load_state_dict(weights.state_dict())
        for block in self.blocks:
            block.register_forward_pre_hook(self._refuse)

    @staticmethod
    def _refuse(*_):
        raise AssertionError("the teacher ran although its outputs were cached")


def test_cached_hint_features_are_the_teachers_block_outputs_on_the_students_inputs(tmp_path):
    data, t = random_splits(), teacher()
    cache = TeacherCache(t, data, seed=7, views=2, directory=tmp_path, node=3)
    assert cache.cache_features(BLOCK)
    for epoch in range(2):
        cache.ensure_view(epoch, BLOCK)
        for idx, x, _ in train_batches(data, 32, epoch, seed=3, views=2, augment_seed=7):
            cached = cache.features(idx, epoch, BLOCK)
            with torch.no_grad():
                live = t.block_output(x, BLOCK)
            assert cached.dtype == torch.float16 and cached.shape == live.shape
            assert cached.is_contiguous(memory_format=torch.channels_last)  # as the student's maps are
            assert torch.allclose(cached.float(), live, rtol=4.9e-4, atol=1e-3)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".npy", ".npy", ".safetensors"]


@pytest.mark.parametrize("hint", ["fitnet", "sp"])
def test_a_cached_epoch_runs_no_teacher_forward_hint_included(tmp_path, hint):
    data, t = random_splits(n=64), teacher()
    s = settings(epochs=2, loss=LossWeights(hint=hint, hint_weight=1.0))
    live = train_student(data, s, t)
    first = train_student(data, s, t, [TeacherCache(t, data, seed=7, views=2, directory=tmp_path, node=3)])
    assert first.losses == pytest.approx(live.losses, rel=1e-3)  # fp16 logits and features
    assert first.cache_hit_rate == 0.0  # both views computed by this student

    silent = Refuses(t)  # another process: the files hold every view's logits and hint features
    reopened = TeacherCache(silent, data, seed=7, views=2, directory=tmp_path, node=3)
    again = train_student(data, s, silent, [reopened])
    assert again.cache_hit_rate == 1.0 and again.losses == first.losses


def test_stale_hint_features_are_rebuilt_never_served(tmp_path):
    """Same node id, spec, data and views, other weights (a reused run directory): recomputed."""
    data, a, b = random_splits(), teacher(seed=1), teacher(seed=2)
    idx, x = torch.arange(96), data_view(data)
    with torch.no_grad():
        a_feat, b_feat = a.block_output(x, BLOCK), b.block_output(x, BLOCK)
    assert (a_feat - b_feat).abs().max() > 1e-2  # a stale hit would be far off

    old = TeacherCache(a, data, seed=7, views=1, directory=tmp_path, node=3)
    old.cache_features(BLOCK) and old.ensure_view(0, BLOCK)
    stale = TeacherCache(b, data, seed=7, views=1, directory=tmp_path, node=3)
    assert stale.cache_features(BLOCK) and stale.ensure_view(0, BLOCK)  # computed, not loaded
    assert torch.allclose(stale.features(idx, 0, BLOCK).float(), b_feat, rtol=4.9e-4, atol=1e-3)
    assert stale.counts() == (96, 96)
    assert [p.name for p in tmp_path.glob("*.npy")] == [stale.feature_path(BLOCK, 0).name]  # a's is gone
    assert old.feature_path(BLOCK, 0) != stale.feature_path(BLOCK, 0)

    (stale.feature_path(BLOCK, 0)).write_bytes(b"truncated")  # a damaged file is computed again
    damaged = TeacherCache(b, data, seed=7, views=1, directory=tmp_path, node=3)
    assert damaged.cache_features(BLOCK) and damaged.ensure_view(0, BLOCK)
    assert torch.allclose(damaged.features(idx, 0, BLOCK).float(), b_feat, rtol=4.9e-4, atol=1e-3)


def test_an_oversized_feature_cache_falls_back_to_the_live_hint_with_one_line(tmp_path):
    data, t = random_splits(n=64), teacher()
    c, side = TEACHER.block_output_shapes()[BLOCK]
    mb = 2 * 64 * c * side * side * 2 / 2**20  # two views of 64 samples, fp16
    said = []
    big = TeacherCache(t, data, seed=7, views=2, directory=tmp_path, node=3, feature_mb=mb, log=said.append)
    assert big.cache_features(BLOCK) and said == [
        f"hint features of node 3, block {BLOCK}: {mb:.1f} MB (2 views x 64 x {c}x{side}x{side} fp16) in {tmp_path}"
    ]
    said.clear()
    small = TeacherCache(t, data, seed=7, views=2, feature_mb=mb * 0.99, node=3, log=said.append)
    s = settings(epochs=2)
    calls = []
    handle = t.blocks[BLOCK].register_forward_hook(lambda *_: calls.append(1))
    try:
        fallback = train_student(data, s, t, [small])
    finally:
        handle.remove()
    assert len(said) == 1 and "over --cache-mb" in said[0] and "the hint teacher runs live" in said[0]
    # Filling the logits runs it once per view (one batch each); then to its block in every step.
    assert len(calls) == 2 + 2 * 2
    assert not list(tmp_path.glob("*.npy"))  # nothing written for the features
    live = train_student(data, s, t)
    assert fallback.losses == pytest.approx(live.losses, rel=1e-3)  # the logits still come from the cache


def test_hint_losses_on_cached_half_features_are_computed_in_fp32():
    torch.manual_seed(0)
    student, cached = torch.randn(32, 8, 4, 4), (torch.randn(32, 16, 2, 2) * 3).half()
    for kind, regressor in (("fitnet", HintRegressor(8, 16)), ("sp", None)):
        for ctx in (torch.autocast("cpu", enabled=False), torch.autocast("cpu", dtype=torch.bfloat16)):
            with ctx:  # the regressor is the student's side: under autocast it runs in bf16 for both
                reference = hint_kind(kind).loss(student, cached.float(), regressor)
                got = hint_kind(kind).loss(student, cached, regressor)
            assert got.dtype == torch.float32, kind
            torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-7, msg=kind)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_cache_is_built_in_the_precision_it_is_given(tmp_path, monkeypatch, precision):
    """auto would take bf16 (the probe says AMX): an fp32 run's cache must still never autocast; a
    file built in one precision is never served to a cache of the other."""
    monkeypatch.setattr(device, "cpu_bf16_kind", lambda flags=None: "amx")
    data, t = random_splits(), teacher()
    seen = set()
    handle = t.head.register_forward_hook(
        lambda m, i, out: seen.add((torch.is_autocast_enabled("cpu"), out.dtype))
    )
    cache = TeacherCache(t, data, seed=7, views=1, directory=tmp_path, node=3, precision=precision)
    cache.ensure_view(0)
    handle.remove()
    bf16 = precision == "bf16"
    assert seen == {(bf16, torch.bfloat16 if bf16 else torch.float32)} and cache.precision == precision
    other = "fp32" if bf16 else "bf16"
    assert (
        TeacherCache(t, data, seed=7, views=1, directory=tmp_path, node=3, precision=other).loaded_views == []
    )
    assert TeacherCache(
        t, data, seed=7, views=1, directory=tmp_path, node=3, precision=precision
    ).loaded_views == [0]


def test_a_search_caches_its_teachers_in_the_runs_precision_with_the_hint_features(
    tmp_path, monkeypatch, capsys
):
    """The trainer's caches: in RUN/cache, built in --precision (auto would be bf16 here, as the
    probe says AMX), the hint features included, their size said once; removed when the search
    ends, with a line saying how much that freed."""
    from conftest import smoke_config
    from safetensors import safe_open

    import iterkd.search as search_mod
    from iterkd import run_search

    monkeypatch.setattr(device, "cpu_bf16_kind", lambda flags=None: "amx")
    seen, real_remove = {}, search_mod.remove_cache

    def look_then_remove(run_dir):  # what the cache held just before the search removed it
        seen["logits"] = list((tmp_path / "cache").glob("node-0-*.safetensors"))
        for f in seen["logits"]:
            with safe_open(str(f), framework="pt") as st:
                seen.setdefault("precision", []).append(st.metadata()["precision"])
        seen["features"] = list((tmp_path / "cache").glob("node-0-*-block-*-view-*.npy"))
        seen["bytes"] = sum(p.stat().st_size for p in (tmp_path / "cache").iterdir())
        return real_remove(run_dir)

    monkeypatch.setattr(search_mod, "remove_cache", look_then_remove)
    cfg = smoke_config(tmp_path, max_generations=1, precision="fp32", views=2, epochs=2, root_epochs=1)
    run_search(cfg, progress=False)
    assert len(seen["logits"]) == 1 and seen["precision"] == ["fp32"]
    assert len(seen["features"]) >= 2  # each view
    out = capsys.readouterr().out
    assert "hint features of node 0, block" in out
    assert not (tmp_path / "cache").exists()
    assert f"teacher cache: removed {seen['bytes'] / 2**20:,.1f} MB" in out


def test_an_interrupted_fill_leaves_no_feature_file_and_the_next_one_computes_it(tmp_path):
    data, t = random_splits(), teacher()
    batches = []

    def interrupt_second_batch(*_):
        batches.append(1)
        if len(batches) == 2:
            raise KeyboardInterrupt

    handle = t.blocks[0].register_forward_pre_hook(interrupt_second_batch)
    cache = TeacherCache(t, data, seed=7, views=1, directory=tmp_path, node=3, batch_size=32)
    with pytest.raises(KeyboardInterrupt):
        cache.cache_features(BLOCK) and cache.ensure_view(0, BLOCK)
    handle.remove()
    assert list(tmp_path.iterdir()) == []  # neither a feature file nor its temporary file
    again = TeacherCache(t, data, seed=7, views=1, directory=tmp_path, node=3)
    assert again.cache_features(BLOCK) and again.ensure_view(0, BLOCK)
    assert [p.suffix for p in sorted(tmp_path.iterdir())] == [".npy", ".safetensors"]
