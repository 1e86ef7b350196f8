"""A ``TorchDispatchMode`` watcher shared by the tests of CUDA-graph capturability (the attention launchers, the
models' serving step): it records every op the real dispatcher runs and flags what a capture cannot contain."""
import torch

_HOST_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "lift_fresh", "lift_fresh_copy"}
# ops whose output size depends on tensor data (a GPU runs them with a host sync; a captured graph cannot)
_DATA_SIZED_OPS = {"nonzero", "masked_select", "_unique2", "unique_consecutive", "unique_dim"}


class Watch:
    """Records every op dispatched while active (the real torch dispatcher, through a ``TorchDispatchMode``) and
    flags the ones a CUDA-graph capture cannot contain: host reads of device data, tensors built from host data,
    outputs sized by data (``nonzero`` and boolean indexing, ``repeat_interleave`` without ``output_size``)."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Watch(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.seen = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                kwargs = kwargs or {}
                if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                           for i in (args[1] if len(args) > 1 else ())):
                    name = "index_by_bool_mask"
                if name == "repeat_interleave" and kwargs.get("output_size") is None and \
                        not any(isinstance(a, int) for a in args[2:]):
                    name = "repeat_interleave_without_output_size"
                self.seen.append(name)
                return func(*args, **kwargs)

            def bad(self):
                extra = {"index_by_bool_mask", "repeat_interleave_without_output_size"}
                return sorted(set(self.seen) & (_HOST_SYNC_OPS | _DATA_SIZED_OPS | extra))

        return Watch()
