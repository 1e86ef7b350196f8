"""Compression policies by MALLOC level: precision, pruning, merging, hybrid (DESIGN.md section 1)."""
from .registry import PolicyInput, available_methods, compress, get_policy, register_policy  # noqa: F401
from . import quantize  # noqa: F401,E402
from . import pruning  # noqa: F401,E402
from . import merging  # noqa: F401,E402
from . import precision  # noqa: F401,E402
from . import hybrid  # noqa: F401,E402
from .budget import Budget  # noqa: F401,E402
