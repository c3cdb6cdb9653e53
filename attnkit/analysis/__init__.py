"""Looking at results and models: cost (parameters, multiply-adds), paired statistics over seeds, reports."""
from ..cost import count_macs, count_params
from .stats import PairedComparison, holm, paired_comparison

__all__ = ["PairedComparison", "count_macs", "count_params", "holm", "paired_comparison"]
