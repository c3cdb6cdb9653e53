"""The CPU backend's compiled kernels equal the reference primitives, for every primitive, float32 and bfloat16,
NCHW and channels_last, odd shapes, and inputs with tied maxima (the first index wins, as torch.max)."""
from __future__ import annotations

import pytest
import torch

from attnkit.kernels import cpu, reference

from .primitives import GROUP_MAPS, SHAPES, assert_close, calls, feature_map, outputs

pytestmark = pytest.mark.skipif(cpu.unavailable() is not None, reason=f"CPU kernels: {cpu.unavailable()}")
NAMES = list(calls(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("spatial", [True, False])
def test_every_primitive_equals_the_reference(shape, dtype, rtol, channels_last, ties, spatial):
    x = feature_map(shape, dtype, channels_last, ties, seed=0)
    dy = feature_map(shape, dtype, channels_last, ties=False, seed=1)
    for name, call in calls(x, dy, spatial).items():
        want, got = outputs(call(reference)), outputs(call(cpu))
        assert len(got) == len(want), name
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, rtol, f"{name}[{i}]")
            if g.shape == x.shape and name not in GROUP_MAPS:
                assert g.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_results_do_not_depend_on_the_thread_count():
    x = feature_map((4, 33, 7, 9), torch.float32, True, False, seed=2)
    dy = feature_map((4, 33, 7, 9), torch.float32, True, False, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = {name: outputs(call(cpu)) for name, call in calls(x, dy).items()}
        torch.set_num_threads(2)
        two = {name: outputs(call(cpu)) for name, call in calls(x, dy).items()}
    finally:
        torch.set_num_threads(threads)
    for name in one:
        assert all(torch.equal(a, b) for a, b in zip(one[name], two[name])), name


def test_large_outputs_ask_for_huge_pages_and_stay_exact(monkeypatch):
    """A kernel's output spanning whole 2 MiB pages is advised as huge pages (on Linux), only inside its own bytes;
    the values are the reference's."""
    advised = []
    madvise = cpu._madvise()
    if madvise is None:
        pytest.skip("madvise is Linux's")
    monkeypatch.setattr(cpu, "_madvise", lambda: lambda start, length, advice: advised.append((start, length)) or
                        madvise(start, length, advice))
    x = feature_map((4, 64, 64, 80), torch.float32, False, ties=False, seed=4)  # 5 MiB: holds a whole 2 MiB page
    g = torch.rand(4, 64)
    y = cpu.scale_c(x, g)
    assert_close(y, reference.scale_c(x, g), 1e-6, "scale_c")
    ((start, length),) = advised
    assert start % cpu.HUGE_PAGE == 0 and length % cpu.HUGE_PAGE == 0 and length > 0
    assert y.data_ptr() <= start and start + length <= y.data_ptr() + y.nbytes
