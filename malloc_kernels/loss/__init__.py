"""Training losses with fused CPU kernels.

``linear_cross_entropy(hidden, weight, targets)`` is ``F.cross_entropy(hidden @ weight.T, targets)`` computed in
cache-sized chunks of rows, with the gradients produced in the same pass (see ``ops.py``); ``reference`` holds the
float64 oracle. The recommenders' full-softmax loss over every item uses it.
"""
from . import reference  # noqa: F401
from .ops import cross_entropy_rows_, linear_cross_entropy  # noqa: F401

__all__ = ["linear_cross_entropy", "cross_entropy_rows_", "reference"]
