"""The MALLOC evaluation harness: serving simulation, accuracy/resource tables, Pareto plot (``malloc-eval``)."""
from .methods import MethodSpec, build_grid  # noqa: F401
from .runner import EvalConfig, evaluate_specs, run  # noqa: F401
