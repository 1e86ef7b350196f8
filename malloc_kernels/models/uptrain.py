"""Warm-starting a head- or sequence-level variant from a trained base model ("uptraining").

Training every variant from scratch costs as much as the base model; on 2 CPU cores the MALLOC grid (5 variants x
2 architectures) would take hours. The head-level literature converts a trained multi-head model and fine-tunes it
briefly instead:

* GQA / MQA (Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
  Checkpoints", arXiv 2305.13245): the key and value projections of the heads in a group are mean-pooled into the
  group's single key/value head, then the model is uptrained for a small fraction of the original steps.
* MLA (latent KV; conversion as in MHA2MLA, Ji et al. 2025, arXiv 2502.14837): the stacked key/value projection
  ``W_kv = [W_k; W_v]`` (``[2 H D, d]``) is factorised by a truncated SVD ``U_r S_r V_r^T``; the latent projection
  becomes ``S_r^1/2 V_r^T`` and the per-head up-projections ``w_uk``/``w_uv`` the matching rows of ``U_r S_r^1/2``;
  the key/value bias is carried by the latent bias in the least-squares sense. Exact at full rank for SASRec's linear
  projections; for HSTU, whose projections pass through SiLU, it is only a starting point.
* Linformer / beacon: every base parameter keeps its value (shapes are unchanged); only the new sequence-compression
  parameters start from their initialisation.

``warm_start(variant, base)`` copies/converts ``base``'s weights into ``variant`` in place and returns the names of
the parameters that kept their fresh initialisation.
"""
from __future__ import annotations

from typing import List

import torch

from .recommender import SequentialRecommender


def _split_rows(t: torch.Tensor, sizes) -> List[torch.Tensor]:
    return list(torch.split(t, list(sizes), dim=0))


def _pool_heads(w: torch.Tensor, n_heads: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """Mean of the ``n_heads // n_kv`` consecutive heads of each group (rows ``[n_heads * head_dim, ...]``)."""
    group = n_heads // n_kv
    return w.reshape(n_kv, group, head_dim, *w.shape[1:]).mean(1).reshape(n_kv * head_dim, *w.shape[1:])


def _convert_projection(name: str, base_sd: dict, var_sd: dict, base_cfg, var_cfg) -> bool:
    """Fill ``<prefix>proj.weight/bias`` (and MLA's ``w_uk``/``w_uv``) of the variant from the base's fused
    Q/K/V projection. Returns False when ``name`` is not such a projection."""
    if not name.endswith("qkv.proj.weight"):
        return False
    prefix = name[: -len("proj.weight")]
    H, D = base_cfg.n_heads, base_cfg.head_dim
    W, b = base_sd[prefix + "proj.weight"], base_sd[prefix + "proj.bias"]
    n_u = W.shape[0] - 3 * H * D  # base rows: [u (HSTU only), q, k, v]
    Wu, Wq, Wk, Wv = _split_rows(W, (n_u, H * D, H * D, H * D))
    bu, bq, bk, bv = _split_rows(b, (n_u, H * D, H * D, H * D))
    if var_cfg.heads == "mla":
        r = var_cfg.latent_dim
        # factorise the affine map [W_kv | b_kv] so the bias is part of the best rank-r approximation
        affine = torch.cat([torch.cat([Wk, Wv]), torch.cat([bk, bv])[:, None]], 1).double()
        U, S, Vh = torch.linalg.svd(affine, full_matrices=False)
        root = S[:r].sqrt()
        up = U[:, :r] * root                      # [2 H D, r]
        latent = root[:, None] * Vh[:r]            # [r, d + 1]
        latent_w, latent_b = latent[:, :-1], latent[:, -1]
        var_sd[prefix + "proj.weight"] = torch.cat([Wu, Wq, latent_w.to(W.dtype)])
        var_sd[prefix + "proj.bias"] = torch.cat([bu, bq, latent_b.to(b.dtype)])
        var_sd[prefix + "w_uk"] = up[: H * D].reshape(H, D, r).to(W.dtype)
        var_sd[prefix + "w_uv"] = up[H * D:].reshape(H, D, r).to(W.dtype)
        return True
    Hkv = var_cfg.n_kv_heads
    var_sd[prefix + "proj.weight"] = torch.cat([Wu, Wq, _pool_heads(Wk, H, Hkv, D), _pool_heads(Wv, H, Hkv, D)])
    var_sd[prefix + "proj.bias"] = torch.cat([bu, bq, _pool_heads(bk, H, Hkv, D), _pool_heads(bv, H, Hkv, D)])
    return True


def warm_start(variant: SequentialRecommender, base: SequentialRecommender) -> List[str]:
    """Initialise ``variant`` from the trained ``base`` (same architecture, width, layers and query heads; the base
    must use full multi-head attention). Returns the parameter names left at their initialisation."""
    bc, vc = base.cfg, variant.cfg
    if base.cfg.heads != "mha" or bc.seq_compress is not None or bc.msn:
        raise ValueError("base must be a plain multi-head model (heads='mha', no seq_compress, no msn)")
    for f in ("arch", "n_items", "d_model", "n_layers", "n_heads", "head_dim", "max_len"):
        if getattr(bc, f) != getattr(vc, f):
            raise ValueError(f"base and variant differ in {f}: {getattr(bc, f)} vs {getattr(vc, f)}")
    base_sd = base.state_dict()
    var_sd = variant.state_dict()
    new_sd = dict(var_sd)
    converted = set()
    for name in var_sd:
        if name in converted:
            continue
        if var_sd[name].shape != base_sd.get(name, torch.empty(0)).shape or name.endswith("qkv.proj.weight"):
            if _convert_projection(name, base_sd, new_sd, bc, vc):
                prefix = name[: -len("proj.weight")]
                converted |= {prefix + s for s in ("proj.weight", "proj.bias", "w_uk", "w_uv")}
            continue
        new_sd[name] = base_sd[name]
    variant.load_state_dict(new_sd)
    return [n for n in var_sd if n not in base_sd and n not in converted]
