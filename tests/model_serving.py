"""Shared check of the model tests: serving a request over encoded-history caches vs the training forward."""
import numpy as np
import torch

from malloc_kernels.data import make_jagged


def forward_and_serve(model, n_items, request_len=3, lengths=(20, 6, 3, 1), seed=0):
    """Last-token hidden states of ``model`` computed two ways over ragged users of the given ``lengths`` (items in
    ``1..n_items``, sorted random timestamps): the training forward over each full sequence with its last
    ``request_len`` tokens as the request, and ``serve`` of those tokens over the caches that ``encode_history``
    built from the rest (a user shorter than the request has an empty history). Returns
    ``(full, forward [B, d], served [B, d], caches)`` with ``full`` the jagged full sequences; cached serving must
    equal full recompute."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, n_items + 1, size=n) for n in lengths]
    tss = [np.sort(rng.integers(0, 10 ** 7, size=len(s))) for s in seqs]
    R = request_len
    full = make_jagged(seqs, tss)
    with torch.no_grad():
        forward = model(full, request_len=R)[full.offsets[1:] - 1]
        hist = make_jagged([s[:max(len(s) - R, 0)] for s in seqs], [t[:max(len(t) - R, 0)] for t in tss])
        req = make_jagged([s[max(len(s) - R, 0):] for s in seqs], [t[max(len(t) - R, 0):] for t in tss])
        caches = model.encode_history(hist)
        served = model.serve(req, caches=caches)
    return full, forward, served, caches
