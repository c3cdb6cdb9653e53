"""Deployment: fold BatchNorms for inference (fuse) and export to ONNX, torch.export or TorchScript, checked."""
from .exporting import FORMATS, ExportCheck, ExportReport, export
from .folding import fuse

__all__ = ["FORMATS", "ExportCheck", "ExportReport", "export", "fuse"]
