"""Dense <-> jagged layout conversion (HSTU's jagged ``[total, ...]`` + ``offsets [B+1]``)."""
from __future__ import annotations

import torch


def eager() -> bool:
    """Whether checks that read tensor data may run: not while ``torch.compile`` traces (a data-dependent branch
    breaks the graph). Compiled calls rely on the compiled ops' own bounds checks (``csrc/torch/attention.cpp``)."""
    return not torch.compiler.is_compiling()


def device_assert(ok: torch.Tensor, message: str, exc: type = ValueError) -> None:
    """Require the one-element tensor ``ok`` to be true without reading it on the host.

    On a GPU this is ``torch._assert_async``: no device-to-host synchronisation (so a CUDA graph can capture the
    check), and a failure surfaces at a later synchronisation as a device-side assert (the CUDA context is lost,
    as with any device assert). On the CPU the same op checks at once, and its failure is raised as
    ``exc(message)``; inside a graph ``torch.compile`` traces, the op joins the graph (a failure is then the op's
    own RuntimeError carrying ``message``)."""
    if not eager():
        torch._assert_async(ok, message)
        return
    try:
        torch._assert_async(ok, message)
    except RuntimeError:
        if ok.device.type != "cpu":
            raise
        raise exc(message) from None


def check_offsets(offsets: torch.Tensor, total: int, name: str = "offsets", *, on_device: bool = False
                  ) -> torch.Tensor:
    """Validate jagged offsets: integer ``[B+1]``, starting at 0, non-decreasing, ending at ``total`` (the values
    are checked in eager mode only, see ``eager``). ``on_device``: check the values with one ``device_assert``
    instead of host reads (no synchronisation; what a captured serving step needs)."""
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor [B+1], got {type(offsets).__name__}")
    if offsets.dim() != 1 or offsets.numel() < 1 or offsets.is_floating_point() or offsets.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor [B+1], got {offsets.dtype} {tuple(offsets.shape)}")
    if not eager():
        return offsets.to(torch.int64)
    if on_device:
        ok = (offsets[0] == 0) & (offsets[-1] == total) & (offsets[1:] >= offsets[:-1]).all()
        device_assert(ok, f"{name} must start at 0, be non-decreasing and end at the jagged length {total}")
        return offsets.to(torch.int64)
    if int(offsets[0]) != 0 or int(offsets[-1]) != total:
        raise ValueError(f"{name} must start at 0 and end at the jagged length {total}, got "
                         f"{int(offsets[0])}..{int(offsets[-1])}")
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing")
    return offsets.to(torch.int64)


def jagged_lengths(offsets: torch.Tensor) -> torch.Tensor:
    return (offsets[1:] - offsets[:-1]).to(torch.int64)


def jagged_to_padded(values: torch.Tensor, offsets: torch.Tensor, max_len: int | None = None, pad_value=0, *,
                     check: bool = True):
    """``[total, *rest]`` -> (``[B, *rest[:-1]?...]``) padded with the sequence axis placed for our layouts.

    For ``values`` of shape ``[total, H, D]`` returns ``[B, H, L, D]``; for ``[total, H]`` returns ``[B, H, L]``;
    for ``[total]`` returns ``[B, L]``. Also returns int32 lengths ``[B]``. ``L`` is ``max_len`` (at least every
    user's length; read from the offsets when None). ``check=False`` skips the offsets check (already validated):
    with ``max_len`` given nothing then reads device data.
    """
    if check:
        offsets = check_offsets(offsets, values.shape[0])
    lengths = jagged_lengths(offsets)
    B = lengths.numel()
    L = int(lengths.max()) if (max_len is None and B) else (max_len or 0)
    idx = torch.arange(L, device=values.device)
    valid = idx[None, :] < lengths.to(values.device)[:, None]                     # [B, L]
    src = (offsets[:-1].to(values.device)[:, None] + idx[None, :]).clamp(max=max(values.shape[0] - 1, 0))
    if values.shape[0] == 0:
        out = values.new_full((B, L) + tuple(values.shape[1:]), pad_value)
    else:
        out = values[src]                                                          # [B, L, *rest]
        mask = valid.view(B, L, *([1] * (values.dim() - 1)))
        out = torch.where(mask, out, torch.full_like(out, pad_value))
    if values.dim() >= 2:
        out = out.movedim(1, -2) if values.dim() == 3 else out.movedim(1, -1)
    return out.contiguous(), lengths.to(torch.int32)


def padded_to_jagged(values: torch.Tensor, lengths: torch.Tensor, offsets: torch.Tensor | None = None,
                     total: int | None = None) -> torch.Tensor:
    """Inverse of ``jagged_to_padded``: ``[B, H, L, D]`` / ``[B, H, L]`` / ``[B, L]`` -> ``[total, ...]``.

    With the jagged ``offsets`` and ``total`` (their last value, known on the host from a tensor's shape) the rows
    are gathered by index and nothing reads device data; otherwise a boolean mask selects them (a host sync)."""
    if values.dim() == 4:
        values = values.movedim(2, 1)
    elif values.dim() == 3:
        values = values.movedim(2, 1)
    B, L = values.shape[:2]
    if offsets is not None and total is not None:
        row = torch.arange(total, device=values.device)
        user = torch.searchsorted(offsets[1:].to(values.device), row, right=True)
        return values[user, row - offsets.to(values.device)[user]]
    valid = torch.arange(L, device=values.device)[None, :] < lengths.to(values.device)[:, None]
    return values[valid]


def broadcast_per_entry(t: torch.Tensor, name: str, B: int, H: int, N: int, axis: str = "N") -> torch.Tensor:
    """One value per cached entry, given as ``[N]`` (every user and head alike), ``[B, N]`` (every head alike) or
    ``[B, H, N]``, as a ``[B, H, N]`` view (positions, timestamps, merge counts); anything else is a ValueError
    naming ``name`` and the three accepted shapes."""
    if t.dim() == 1 and t.shape[0] == N:
        return t[None, None].expand(B, H, N)
    if t.dim() == 2 and t.shape == (B, N):
        return t[:, None].expand(B, H, N)
    if t.shape != (B, H, N):
        raise ValueError(f"{name} must be [{axis}], [B, {axis}] or [B, Hkv, {axis}] = {(B, H, N)}, "
                         f"got {tuple(t.shape)}")
    return t
