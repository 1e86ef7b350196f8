"""The best plain-PyTorch formulations a user would write for what our kernels compute -- the baselines of the
speedup columns (beating our own padded reference says little; beating these is the claim):

* softmax attention: ``F.scaled_dot_product_attention`` (fused flash/math kernels; GQA by ``enable_gqa``);
* HSTU pointwise attention: one masked batched matmul, ``(silu(q k^T * scale + bias) * mask / n) @ v``, with GQA
  folded into the matmul's batch (no repeated K/V) and the bias a gather from the table;
* jagged batches: pad once with one index_put, run the padded formulation, unpad with one gather (what a user
  without a jagged kernel does; the padded rows past a user's length are computed and dropped).

Each is checked against the float64 reference in the benchmarks' smoke runs, so a speedup is never against a
baseline that computes something else.
"""
import torch
import torch.nn.functional as F


def hstu_masked_matmul(q, k, v, mask, n, scale, bias=None):
    """q ``[B, Hq, L, D]``, k/v ``[B, Hkv, N, D]``, mask bool ``[L, N]`` (or broadcastable to ``[B, 1, 1, L, N]``),
    n ``[L]`` (or broadcastable) visible-key counts, bias broadcastable to ``[B, Hkv, G, L, N]`` or None ->
    ``[B, Hq, L, D]``."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    s = torch.matmul(q.reshape(B, Hkv, G * L, D), k.transpose(-1, -2)).view(B, Hkv, G, L, -1) * scale
    if bias is not None:
        s = s + bias
    w = F.silu(s) * mask / n[..., None]
    return torch.matmul(w.reshape(B, Hkv, G * L, -1), v).view(B, Hq, L, D)


class Padder:
    """Jagged ``[T, H, D]`` <-> padded ``[B, H, Lmax, D]`` for a fixed ``offsets [B + 1]`` (autograd-friendly)."""

    def __init__(self, offsets):
        lens = offsets[1:] - offsets[:-1]
        self.B, self.L = lens.numel(), int(lens.max())
        self.user = torch.repeat_interleave(torch.arange(self.B), lens)
        self.pos = torch.arange(int(offsets[-1])) - offsets[:-1][self.user]

    def pad(self, x):
        out = x.new_zeros(self.B, self.L, x.shape[1], x.shape[2])
        out = out.index_put((self.user, self.pos), x)
        return out.transpose(1, 2)

    def unpad(self, y):
        return y.transpose(1, 2)[self.user, self.pos]


def train_softmax(q, k, v, offsets, padder=None):
    """Jagged causal softmax self-attention via padded SDPA (exact for every valid row: padding sits after it)."""
    p = padder or Padder(offsets)
    out = F.scaled_dot_product_attention(p.pad(q), p.pad(k), p.pad(v), is_causal=True,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return p.unpad(out)


def train_hstu(q, k, v, offsets, positions, pos_bias, padder=None):
    """Jagged causal HSTU self-attention with a shared relative position table ``pos_bias [P]`` (bias of key j for
    query i: ``pos_bias[clamp(pos_i - pos_j, 0, P - 1)]``), normalised by the visible count i + 1."""
    p = padder or Padder(offsets)
    qp, kp, vp = p.pad(q), p.pad(k), p.pad(v)
    L, D, P = p.L, q.shape[-1], pos_bias.shape[0]
    pp = positions.new_zeros(p.B, L).index_put((p.user, p.pos), positions)
    rel = (pp[:, :, None] - pp[:, None, :]).clamp(0, P - 1)
    bias = pos_bias[rel][:, None, None]                                  # [B, 1, 1, L, L]
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    n = torch.arange(1, L + 1, dtype=q.dtype)
    return p.unpad(hstu_masked_matmul(qp, kp, vp, mask, n, D ** -0.5, bias))
