"""Fused forward and backward passes of the gate modules, near the memory-traffic floor.

SE, ECA, SRM, Gather-Excite θ⁻, θ and θ⁺ (global extent), CBAM, Coordinate Attention, Triplet Attention, GCT (its
sums of squares from the mean and M2 of SRM's pass), FcaNet (its DCT filters as Gather-Excite θ's depthwise kernel),
SimAM (SRM's pass, then an elementwise gate of its own), scSE (the means and its 1×1 convolution's weighted sum over C,
then one pass that combines x·s and x·q), SGE (the means, then each group's similarity map) and Shuffle Attention
(SRM's pass, then an elementwise gate written to the shuffled channels) run, by default, a fused path: one pass over x to pool, one to scale; in the backward one pass over dy and x to reduce and
one to write dx, saving only x and the small pooled tensors (functions.py). Each pass is a backend primitive:
  cpu.py      compiled C loops (OpenMP), float32 and bfloat16, NCHW and channels_last;
  triton.py   Triton kernels for CUDA, float32, bfloat16 and float16, NCHW and channels_last, deterministic;
  reference.py  the same primitives as plain torch ops: the specification the backends are tested against.
The modules' own forward formulas stay the reference path; outside it (`reference_only`), they compute their small
gate networks as linear algebra on the pooled N×C statistics, the same function at a fraction of the per-call cost,
and on the CPU the k×k convolution of CBAM's and Triplet Attention's two pooled maps by direct kernels of the CPU
backend (`cpu.conv_planes`), where PyTorch's convolution runs that shape far below its arithmetic's speed.

Choosing (dispatch.py): `attnkit.kernels.set_mode(m)`, `with attnkit.kernels.use(m): ...` or ATTNKIT_KERNELS=m,
with m one of 'auto' (fused where a backend serves the input and it pays, see dispatch.py, else the reference: the
default), 'reference', 'cpu' or 'triton' (that backend or an error). Tracing, scripting, torch.compile and export
always see the reference formulas. The fused path's backward cannot be differentiated again: for double backward
(gradient penalties), use 'reference'.
"""
from .dispatch import MODES, backend_for, get_mode, reference_only, route, set_mode, use, whole_module

__all__ = ["MODES", "backend_for", "get_mode", "reference_only", "route", "set_mode", "use", "whole_module"]
