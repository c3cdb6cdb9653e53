"""fuse(): an inference copy of a model with every BatchNorm folded into the layer before it, where exact.

A BatchNorm in eval mode is a fixed per-channel affine map, so BN(conv(x)) is one convolution with scaled
weights and a bias. fuse() finds the pairs by tracing the model with torch.fx: a convolution or Linear
whose output goes only to a BatchNorm, each called once. The folding itself is torch's
(torch.nn.utils.fusion). Modules whose BatchNorm follows something other than a layer fold it themselves
through a `fold_batchnorm()` method (SRM's channel-wise FC). Models that torch.fx cannot trace fall back to
the pairs that are adjacent in a plain nn.Sequential. Gates that attach() placed after a folded BatchNorm
move to the Identity that replaces it; gates on a convolution's input (GCT's) stay on the folded convolution's.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..surgery import gates_before, gates_of, with_gates_of
from ..surgery.gating import is_gated, ungated

__all__ = ["fuse"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _traced_pairs(root: nn.Module) -> tuple[list[tuple[str, str]], set[str]]:
    """(layer, norm) paths in `root` where the norm is applied to the layer's output and nothing else reads it, and the
    layers traced as one call (a gated torch.nn layer is one call that includes its gates)."""
    graph = fx.Tracer().trace(root)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        if source.op != "call_module" or len(source.users) != 1 or len(node.args) != 1 or node.kwargs:
            continue
        if calls[node.target] == 1 and calls[source.target] == 1:
            pairs.append((source.target, node.target))
    return pairs, set(calls)


def _sequential_pairs(root: nn.Module) -> list[tuple[str, str]]:
    """Adjacent (layer, norm) children of containers whose forward is nn.Sequential's own."""
    pairs = []
    for path, module in root.named_modules():
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            names = [name for name, _ in module.named_children()]
            prefix = f"{path}." if path else ""
            pairs += [(prefix + a, prefix + b) for a, b in zip(names, names[1:])]
    return pairs


def _candidate_pairs(model: nn.Module) -> list[tuple[str, str]]:
    paths = {id(m): p for p, m in model.named_modules()}
    try:
        pairs, one_call = _traced_pairs(model)
    except Exception:  # torch.fx cannot trace data-dependent control flow; fall back to what is certain
        pairs, one_call = _sequential_pairs(model), set(paths.values())
    # gates the trace did not go through (those of a layer traced as one call) are traced on their own
    for module in model.modules():
        if paths.get(id(module)) in one_call:
            for gate in gates_before(module) + gates_of(module):
                prefix = paths[id(gate)] + "."
                pairs += [(prefix + a, prefix + b) for a, b in _candidate_pairs(gate)]
    return pairs


def _foldable(layer: nn.Module, norm: nn.Module) -> bool:
    """Exactly torch's layers (a subclass may transform its weight, as weight standardisation does), with no gate
    on their output (gates on their input are kept), followed by a BatchNorm over their output channels that has
    running statistics."""
    if gates_of(layer) or not isinstance(norm, _NORMS) or norm.running_mean is None:
        return False
    with ungated(layer):
        if type(layer) not in _LAYERS:
            return False
    width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return norm.num_features == width


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


@torch.no_grad()
def fuse(model: nn.Module) -> nn.Module:
    """An inference copy of `model` (in eval mode) with its BatchNorms folded away wherever that is exact.

    The copy computes the same function as the eval-mode model (to float rounding) with fewer parameters
    and fewer passes over the feature maps. The original is left unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse() takes an nn.Module, got {type(model).__name__}.")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"fuse() folds the BatchNorms' running statistics, which only eval mode uses, but the model is in "
            f"training mode ({training[0]}{f' and {len(training) - 1} more' if len(training) > 1 else ''}). "
            f"Call model.eval() first."
        )
    fused = copy.deepcopy(model)
    for layer_path, norm_path in _candidate_pairs(fused):
        layer, norm = fused.get_submodule(layer_path), fused.get_submodule(norm_path)
        if not _foldable(layer, norm):
            continue
        with ungated(layer):  # folded alone; its input's gates (registered elsewhere in the model) are put back on it
            folded = fuse_linear_bn_eval(layer, norm) if isinstance(layer, nn.Linear) else fuse_conv_bn_eval(layer, norm)
        _set(fused, layer_path, with_gates_of(layer, folded) if is_gated(layer) else folded)
        _set(fused, norm_path, with_gates_of(norm, nn.Identity()))
    for module in fused.modules():
        if hasattr(module, "fold_batchnorm"):
            module.fold_batchnorm()
    return fused
