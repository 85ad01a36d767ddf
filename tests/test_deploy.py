"""Timing helpers: the thread count is restored, warm-up calls are not timed."""

import pytest
import torch

from iterkd.deploy import median_seconds, torch_threads


def test_torch_threads_is_restored_even_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_median_seconds_times_only_the_repeats():
    calls = []
    seconds = median_seconds(lambda: calls.append(1), warmup=3, repeats=5)
    assert len(calls) == 8 and 0 <= seconds < 0.1
