"""Every backend implements the Backend protocol: reference.py (the specification), the CPU and the Triton backend
have each primitive, with the protocol's parameters; the primitive tests call every one; the kernel mode of a `use`
block is the current thread's."""
from __future__ import annotations

import inspect
import threading

import torch

from attnkit import kernels
from attnkit.kernels import cpu, reference
from attnkit.kernels import triton as triton_backend
from attnkit.kernels.backend import PRIMITIVES, Backend

from .primitives import calls


def parameters(function: object) -> list[str]:
    return [p for p in inspect.signature(function).parameters if p != "self"]


def test_reference_states_exactly_the_protocols_primitives():
    public = {name for name, f in inspect.getmembers(reference, inspect.isfunction)
              if not name.startswith("_") and f.__module__ == reference.__name__}
    assert public == set(PRIMITIVES) and len(PRIMITIVES) == 41


def test_every_backend_has_every_primitive_with_its_parameters():
    for backend in (reference, cpu, triton_backend):
        for name in PRIMITIVES:
            assert callable(getattr(backend, name, None)), f"{backend.__name__} lacks {name}"
            assert parameters(getattr(backend, name)) == parameters(getattr(Backend, name)), f"{backend.__name__}.{name}"
    assert all(callable(b.unavailable) for b in (cpu, triton_backend))


def test_the_primitive_tests_call_every_primitive():
    x = torch.randn(2, 3, 4, 5)
    assert {name.split()[0] for name in calls(x, x)} == set(PRIMITIVES)


def test_a_use_block_sets_the_mode_of_its_own_thread_only():
    seen = {}
    inside, done = threading.Event(), threading.Event()

    def other() -> None:
        inside.wait()
        seen["other"] = kernels.get_mode()
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    assert kernels.get_mode() == "auto"
    with kernels.use("reference"):
        inside.set()
        done.wait(5)
        seen["own"] = kernels.get_mode()
        with kernels.use("cpu"):
            seen["nested"] = kernels.get_mode()
        seen["after nested"] = kernels.get_mode()
    thread.join()
    assert seen == {"other": "auto", "own": "reference", "nested": "cpu", "after nested": "reference"}
    assert kernels.get_mode() == "auto"
