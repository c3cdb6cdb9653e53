"""The Triton backend (attnkit/kernels/triton.py) against its specification, reference.py.

Without CUDA the kernels run under Triton's interpreter on the CPU: tests/conftest.py sets TRITON_INTERPRET=1 before
anything imports Triton. Shapes are tiny and odd, as the interpreter is slow.

Every comparison runs the reference on the same inputs: full-size outputs (y, dx) must be bit-identical (every
rounding to x's dtype as the reference writes it; SimAM's and Shuffle Attention's, which hold an exponential, within 4
units of the last place) and keep x's memory format, argmax indices identical (the first
maximum, on inputs full of ties), float32 statistics within 1e-5 of the reference relative to their norm (both sum
the same rounded values in float32, in different orders).
"""
from __future__ import annotations

import copy
import importlib.util
import os
import sys

import pytest
import torch

from attnkit.kernels import reference
from attnkit.kernels import triton as backend

from .modules import create, errors, randomised, run_in_mode
from .primitives import COMBINES, GROUP_MAPS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", autouse=True)
def runnable():
    """A skip, with the backend's reason, where it cannot run (no CUDA and no interpreter)."""
    if backend.unavailable():
        pytest.skip(f"the Triton backend cannot run here: it {backend.unavailable()}")


SHAPES = [(2, 5, 3, 7), (1, 3, 1, 1), (3, 17, 6, 5), (1, 1, 5, 2)]
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


class Inputs:
    """Random inputs for one shape, dtype and layout; with `ties`, small integers, so that maxima repeat."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, layout: torch.memory_format,
                 ties: bool = False, seed: int = 0):
        self.shape, self.dtype, self.layout, self.ties = shape, dtype, layout, ties
        self.generator = torch.Generator().manual_seed(seed)
        self.x, self.dy = self.full(), self.full()

    def _values(self, *shape: int) -> torch.Tensor:
        if self.ties:
            return torch.randint(-3, 4, shape, generator=self.generator).float()
        return torch.randn(shape, generator=self.generator)

    def full(self) -> torch.Tensor:
        return self._values(*self.shape).to(self.dtype).contiguous(memory_format=self.layout).to(DEVICE)

    def f(self, *dims: str) -> torch.Tensor:
        """A float32 factor over the named dims, e.g. f("n", "c")."""
        sizes = dict(zip("nchw", self.shape))
        values = self._values(*[sizes[d] for d in dims])
        return (values.abs() + 1 if self.ties else values).to(DEVICE)  # positive integers keep ties in x·mc

    @property
    def groups(self) -> int:
        """SGE's group count: 3 or 5 where they divide C (groups of one channel for C = 3, 5), else one group."""
        return next(k for k in (3, 5, 1) if self.shape[1] % k == 0)

    def per_group(self) -> torch.Tensor:
        """A float32 map [N, G, H, W] for `groups` groups."""
        n, _, h, w = self.shape
        values = self._values(n, self.groups, h, w)
        return (values.abs() + 1 if self.ties else values).to(DEVICE)

    def perm(self) -> torch.Tensor:
        """A permutation of the channels (Shuffle Attention's output order)."""
        return torch.randperm(self.shape[1], generator=self.generator).to(DEVICE)

    def index(self, high: int, *dims: str) -> torch.Tensor:
        sizes = dict(zip("nchw", self.shape))
        return torch.randint(high, [sizes[d] for d in dims], generator=self.generator).to(DEVICE)

    def pools(self, spatial: bool) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]:
        """(v, argmax, u) for the pools over H, W and (spatial) C, as grad_mean3 takes them."""
        _, c, h, w = self.shape
        pools = ((self.f("n", "c", "w"), self.index(h, "n", "c", "w"), self.f("n", "c", "w")),
                 (self.f("n", "c", "h"), self.index(w, "n", "c", "h"), self.f("n", "c", "h")),
                 (self.f("n", "h", "w"), self.index(c, "n", "h", "w"), self.f("n", "h", "w")))
        return pools if spatial else pools[:2]


# (test id, primitive, its arguments from Inputs)
CASES = [
    ("pool_hw", "pool_hw", lambda i: (i.x, True)),
    ("pool_hw-mean", "pool_hw", lambda i: (i.x, False)),
    ("scale_c", "scale_c", lambda i: (i.x, i.f("n", "c"))),
    ("dot_hw", "dot_hw", lambda i: (i.dy, i.x)),
    ("scale_c_add", "scale_c_add", lambda i: (i.x, i.f("n", "c"), i.dy, False)),
    ("scale_c_add-relu", "scale_c_add", lambda i: (i.x, i.f("n", "c"), i.dy, True)),
    ("dot_hw_relu", "dot_hw_relu", lambda i: (i.dy, i.x, i.x)),
    ("grad_c", "grad_c", lambda i: (i.dy, i.f("n", "c"), i.f("n", "c"))),
    ("grad_c-m2", "grad_c", lambda i: (i.dy, i.f("n", "c"), i.f("n", "c"), i.x, i.f("n", "c"), i.f("n", "c"))),
    ("pool_abs_hw", "pool_abs_hw", lambda i: (i.x,)),
    ("grad_c_sign", "grad_c_sign", lambda i: (i.dy, i.f("n", "c"), i.f("n", "c"), i.x)),
    ("pool_k", "pool_k", lambda i: (i.x, i.f("c", "h", "w"))),
    ("grad_k", "grad_k", lambda i: (i.dy, i.f("n", "c"), i.f("n", "c"), i.x, i.f("c", "h", "w"), True, True)),
    ("grad_k-dx", "grad_k", lambda i: (i.dy, i.f("n", "c"), i.f("n", "c"), i.x, i.f("c", "h", "w"), True, False)),
    ("grad_k-dk", "grad_k", lambda i: (i.dy, i.f("n", "c"), i.f("n", "c"), i.x, i.f("c", "h", "w"), False, True)),
    ("pool_h_w", "pool_h_w", lambda i: (i.x,)),
    ("scale_hw", "scale_hw", lambda i: (i.x, i.f("n", "c", "h"), i.f("n", "c", "w"))),
    ("scale_hw_add", "scale_hw_add", lambda i: (i.x, i.f("n", "c", "h"), i.f("n", "c", "w"), i.dy, False)),
    ("scale_hw_add-relu", "scale_hw_add", lambda i: (i.x, i.f("n", "c", "h"), i.f("n", "c", "w"), i.dy, True)),
    ("dot_h_w", "dot_h_w", lambda i: (i.dy, i.x, i.f("n", "c", "h"), i.f("n", "c", "w"))),
    ("grad_hw", "grad_hw", lambda i: (i.dy, i.f("n", "c", "h"), i.f("n", "c", "w"), i.f("n", "c", "h"),
                                      i.f("n", "c", "w"))),
    ("pool_hw_avgmax", "pool_hw_avgmax", lambda i: (i.x,)),
    ("pool_c_gated", "pool_c_gated", lambda i: (i.x, i.f("n", "c"))),
    ("scale_cs", "scale_cs", lambda i: (i.x, i.f("n", "c"), i.f("n", "h", "w"))),
    ("scale_cs_add", "scale_cs_add", lambda i: (i.x, i.f("n", "c"), i.f("n", "h", "w"), i.dy, False)),
    ("scale_cs_add-relu", "scale_cs_add", lambda i: (i.x, i.f("n", "c"), i.f("n", "h", "w"), i.dy, True)),
    ("dot_cs", "dot_cs", lambda i: (i.dy, i.x, i.f("n", "c"), i.f("n", "h", "w"))),
    ("dot_x_s", "dot_x_s", lambda i: (i.x, i.f("n", "h", "w"), i.f("n", "h", "w"),
                                      i.index(i.shape[1], "n", "h", "w"))),
    ("grad_cs", "grad_cs", lambda i: (i.dy, i.f("n", "c"), i.f("n", "h", "w"), i.f("n", "h", "w"), i.f("n", "h", "w"),
                                      i.index(i.shape[1], "n", "h", "w"), i.f("n", "c"), i.f("n", "c"),
                                      i.index(i.shape[2] * i.shape[3], "n", "c"))),
    ("zpool3", "zpool3", lambda i: (i.x, True)),
    ("zpool3-hw", "zpool3", lambda i: (i.x, False)),
    ("scale_mean3", "scale_mean3", lambda i: (i.x, i.f("n", "c", "w"), i.f("n", "c", "h"), i.f("n", "h", "w"))),
    ("scale_mean3-hw", "scale_mean3", lambda i: (i.x, i.f("n", "c", "w"), i.f("n", "c", "h"), None)),
    ("dot3", "dot3", lambda i: (i.dy, i.x, True)),
    ("dot3-hw", "dot3", lambda i: (i.dy, i.x, False)),
    ("grad_mean3", "grad_mean3", lambda i: (i.dy, i.f("n", "c", "w"), i.f("n", "c", "h"), i.f("n", "h", "w"),
                                            i.pools(True))),
    ("grad_mean3-hw", "grad_mean3", lambda i: (i.dy, i.f("n", "c", "w"), i.f("n", "c", "h"), None, i.pools(False))),
    ("scale_energy", "scale_energy", lambda i: (i.x, i.f("n", "c"), i.f("n", "c").abs() + 0.5)),
    ("dot_energy", "dot_energy", lambda i: (i.dy, i.x, i.f("n", "c"), i.f("n", "c").abs() + 0.5)),
    ("grad_energy", "grad_energy", lambda i: (i.dy, i.x, i.f("n", "c"), i.f("n", "c").abs() + 0.5, i.f("n", "c"),
                                              i.f("n", "c"))),
    ("pool_c_weighted", "pool_c_weighted", lambda i: (i.x, i.f("c"))),
    *[(f"scale_pair-{combine}", "scale_pair", lambda i, combine=combine: (i.x, i.f("n", "c"), i.f("n", "h", "w"),
                                                                           combine)) for combine in COMBINES],
    *[(f"dot_pair-{combine}", "dot_pair", lambda i, combine=combine: (i.dy, i.x, i.f("n", "c"), i.f("n", "h", "w"),
                                                                       combine)) for combine in COMBINES],
    *[(f"grad_pair-{combine}", "grad_pair", lambda i, combine=combine: (i.dy, i.x, i.f("n", "c"), i.f("n", "h", "w"),
                                                                         combine, i.f("n", "c"), i.f("c"),
                                                                         i.f("n", "h", "w"))) for combine in COMBINES],
    ("pool_groups", "pool_groups", lambda i: (i.x, i.f("n", "c"), i.groups)),
    ("scale_groups", "scale_groups", lambda i: (i.x, i.per_group())),
    ("dot_groups", "dot_groups", lambda i: (i.dy, i.x, i.groups)),
    ("dot_x_groups", "dot_x_groups", lambda i: (i.x, i.per_group())),
    ("grad_groups", "grad_groups", lambda i: (i.dy, i.per_group(), i.f("n", "c"), i.per_group(), i.f("n", "c"))),
    ("scale_affine", "scale_affine", lambda i: (i.x, i.f("n", "c"), i.f("n", "c"), i.f("n", "c"), i.perm())),
    ("dot_affine", "dot_affine", lambda i: (i.dy, i.x, i.f("n", "c"), i.f("n", "c"), i.f("n", "c"), i.perm())),
    ("grad_affine", "grad_affine", lambda i: (i.dy, i.x, i.f("n", "c"), i.f("n", "c"), i.f("n", "c"), i.f("n", "c"),
                                              i.f("n", "c"), i.perm())),
]
NAMES = [name for name, _, _ in CASES]
ARGMAX = ["pool_hw_avgmax", "pool_c_gated", "zpool3", "zpool3-hw"]
TIES = ARGMAX + ["scale_pair-max", "dot_pair-max", "grad_pair-max"]  # scSE's maximum: ties split its gradient
TRANSCENDENTAL = ["scale_energy", "grad_energy", "scale_affine", "grad_affine"]


def assert_matches(got: object, want: object, layout: torch.memory_format, where: str = "output",
                   transcendental: bool = False, statistics: bool = False) -> None:
    """got equals want as the module docstring says, recursively through tuples. A `transcendental` primitive's
    full-size outputs (SimAM's gate σ) within 4 units of the last place of their dtype, relative to their largest
    value: Triton's exponential and torch's differ in the last bit, which rounding the gate to x's dtype can carry.
    `statistics`: a 4-D result that is a float32 statistic (SGE's per-group maps), compared as the others."""
    if want is None or isinstance(want, tuple):
        assert type(got) is type(want), f"{where}: {type(got).__name__}, expected {type(want).__name__}"
        for k, (g, w) in enumerate(zip(got or (), want or ())):
            assert_matches(g, w, layout, f"{where}[{k}]", transcendental, statistics)
        assert len(got or ()) == len(want or ()), f"{where}: {len(got)} outputs, expected {len(want)}"
        return
    assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device), where
    if want.dim() == 4 and not statistics:
        assert got.is_contiguous(memory_format=layout), f"{where}: strides {got.stride()}, not x's layout"
        if transcendental:
            error = (got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)
            assert error <= 4 * torch.finfo(want.dtype).eps, f"{where}: relative error {error:.2e}"
            return
        assert torch.equal(got, want), f"{where}: {(got != want).sum()} elements differ from the reference"
    elif want.dtype == torch.int64:
        assert torch.equal(got, want), f"{where}: indices {got.flatten().tolist()} != {want.flatten().tolist()}"
    else:
        error = (got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)
        assert error <= 1e-5, f"{where}: relative error {error:.2e}"


def flat(result: object) -> list[torch.Tensor]:
    """The tensors of a primitive's result, in order."""
    return [t for r in result for t in flat(r)] if isinstance(result, tuple) else [result]


def both(case: str, inputs: Inputs) -> tuple[object, object]:
    """(the backend's result, the reference's) for a case of CASES on the same arguments."""
    _, primitive, make = next(c for c in CASES if c[0] == case)
    args = make(inputs)
    return getattr(backend, primitive)(*args), getattr(reference, primitive)(*args)


def run_case(case: str, shape: tuple[int, int, int, int], dtype: torch.dtype, layout: torch.memory_format,
             ties: bool = False) -> None:
    assert_matches(*both(case, Inputs(shape, dtype, layout, ties)), layout, transcendental=case in TRANSCENDENTAL,
                   statistics=case in GROUP_MAPS)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few elements, and C in chunks of two blocks for a 1×5×3×7 input, so that every loop, mask and
    merge of partial results runs more than once on a tiny input."""
    for name, value in (("_TILE", 16), ("_RUN_P", 4), ("_RUN_C", 2), ("_PROGRAMS", 6)):
        monkeypatch.setattr(backend, name, value)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", NAMES)
def test_float32(case, shape, layout):
    run_case(case, shape, torch.float32, layout)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", NAMES)
def test_half(case, dtype, layout):
    run_case(case, (2, 5, 3, 7), dtype, layout)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", TIES)
def test_ties_take_the_first_maximum(case, dtype, layout):
    run_case(case, (3, 17, 6, 5), dtype, layout, ties=True)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("case", NAMES)
def test_small_blocks(case, layout, small_blocks):
    run_case(case, (1, 5, 3, 7), torch.float32, layout, ties=case in TIES)


@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("case", ["pool_groups", "scale_groups", "dot_groups", "dot_x_groups", "grad_groups"])
def test_groups_of_several_channels(case, layout, blocks, request):
    """SGE's primitives with 3 groups of 4 channels (and, with small blocks, groups spanning several blocks)."""
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    run_case(case, (2, 12, 3, 5), torch.float32, layout)


@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("case", ARGMAX)
def test_nan_wins_the_maximum(case, layout, blocks, request):
    """Like torch.max: a NaN is the maximum, the first NaN its index; a row of -inf keeps index 0."""
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    inputs = Inputs((2, 5, 3, 7), torch.float32, layout, ties=True)
    inputs.x[0, 1, 2, 3] = inputs.x[1, 2, 0, 0] = inputs.x[1, 2, 1, 5] = inputs.x[1, 4, 2, 6] = float("nan")
    inputs.x[0, 3] = float("-inf")
    got, want = both(case, inputs)
    for g, w in zip(flat(got), flat(want), strict=True):
        assert torch.equal(g, w) if w.dtype == torch.int64 else torch.allclose(g, w, rtol=1e-5, equal_nan=True)
    assert any(w.isnan().any() for w in flat(want) if w.is_floating_point())


@pytest.mark.parametrize("blocks", ["default", "small"])
def test_m2_is_accurate_for_a_large_mean(blocks, request):
    """M2 of values spread by 0.01 around 1000 within 1e-5 of float64's (the reference's own float32 two-pass sum,
    centred on a rounded mean, is off by about 1e-5 here)."""
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    x = 1000 + 0.01 * torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    exact = x.double()
    exact = ((exact - exact.mean((2, 3), keepdim=True)) ** 2).sum((2, 3))
    mean, m2 = backend.pool_hw(x.to(DEVICE), True)
    assert (m2.cpu().double() - exact).abs().max() / exact.abs().max() <= 1e-5
    assert torch.allclose(mean.cpu(), x.double().mean((2, 3)).float(), rtol=1e-7)


def test_mixed_layouts_and_other_strides():
    """dy and x in different layouts; an x in neither layout (copied to NCHW first)."""
    inputs = Inputs((2, 5, 3, 7), torch.float32, torch.channels_last)
    dy, mc, ms = inputs.dy.contiguous(), inputs.f("n", "c"), inputs.f("n", "h", "w")
    assert_matches(backend.dot_hw(dy, inputs.x), reference.dot_hw(dy, inputs.x), torch.channels_last)
    assert_matches(backend.dot_cs(dy, inputs.x, mc, ms), reference.dot_cs(dy, inputs.x, mc, ms), torch.channels_last)
    g = inputs.f("n", "c")
    for x in inputs.full().transpose(2, 3)[:, :, 1:], inputs.full()[..., 2:3]:  # strides of neither layout
        assert torch.equal(backend.scale_c(x, g), reference.scale_c(x, g))
        assert_matches(backend.pool_hw(x, True), reference.pool_hw(x, True), torch.contiguous_format)


def test_deterministic():
    """Reductions that split C into chunks give bit-identical results run after run."""
    inputs = Inputs((3, 17, 6, 5), torch.bfloat16, torch.channels_last)
    args = (inputs.dy, inputs.x, inputs.f("n", "c"), inputs.f("n", "h", "w"))
    first = backend.dot_cs(*args)
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(backend.dot_cs(*args), first))


def test_helpers():
    assert backend.interpreting() == (os.environ.get("TRITON_INTERPRET") == "1")
    assert backend.unavailable() is None
    inputs = Inputs((1, 3, 2, 2), torch.float32, torch.contiguous_format)
    with pytest.raises(ValueError, match="grad_mean3: 3 pools"):
        backend.grad_mean3(inputs.dy, inputs.f("n", "c", "w"), inputs.f("n", "c", "h"), inputs.f("n", "h", "w"),
                           inputs.pools(False))
    with pytest.raises(ValueError, match="needs an N×C×H×W tensor"):
        backend.scale_c(inputs.x.double(), inputs.f("n", "c"))


def test_imports_without_triton(monkeypatch):
    """Without the triton package the module still imports and says why it cannot run."""
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    spec = importlib.util.spec_from_file_location("attnkit.kernels._triton_without_triton", backend.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.unavailable() == "needs the triton package: pip install triton"
    with pytest.raises(RuntimeError, match="needs the triton package"):
        module.pool_hw(torch.zeros(1, 1, 1, 1), False)


MODULES = ["se", "eca", "srm", "ge", "ge(variant='theta', spatial_size={hw})", "cbam(reduction=4)",
           "cbam(reduction=4, pool_types=('avg',), residual=True)", "coord", "triplet(kernel_size=3)",
           "triplet(no_spatial=True)", "gct", "gct(mode='l1')", "gct(mode='l1', after_relu=True)",
           "fca(reduction=2, frequencies='top2')",
           "simam", "scse", "scse(combine='add')", "scse(combine='mul')",
           "sge(groups=3)", "shuffle(groups=3)", "ema(groups=3)"]


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("spec", MODULES)
def test_modules_on_the_triton_path_equal_the_reference(spec, layout):
    """Every fused module in mode 'triton', trained one step: output, input and parameter gradients and BatchNorm
    statistics within 1e-5 of the reference path's."""
    shape = (3, 6, 5, 4)
    module = randomised(create(spec, shape), seed=0).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    x, dy = (torch.randn(shape, generator=g).contiguous(memory_format=layout).to(DEVICE) for _ in range(2))
    want = run_in_mode(copy.deepcopy(module), x, dy, "reference")
    got = run_in_mode(copy.deepcopy(module), x, dy, "triton")
    assert got[0].is_contiguous(memory_format=layout)
    assert max(errors(got, want)) <= 1e-5

