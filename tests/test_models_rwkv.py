"""The RWKV-4 recommender (``models/rwkv.py``): serving from the per-user recurrent state equals re-running the whole
history (N = 1, 17, 1,000; float64 to rounding, float32 within the usual tolerance), appending requests to a state,
constant bytes per user, the state's wire format and its refusals, gradients through the C++ WKV kernel, training
through ``models.train`` and the checkpoints."""
import struct
import zlib

import numpy as np
import pytest
import torch

from malloc_kernels.data import make_jagged, synthetic_dataset
from malloc_kernels.models import ModelConfig, build_model, evaluate
from malloc_kernels.models.rwkv import RWKVRecommender
from malloc_kernels.models.rwkv_state import (FRAMING_BYTES, RWKVLayerState, empty_states, states_from_bytes,
                                              states_to_bytes)
from malloc_kernels.models.train import TrainConfig, load_checkpoint, train

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}   # the attention models' (tests/test_models.py)


def _model(dtype=torch.float64, n_items=80, d=24, layers=2, seed=0):
    torch.manual_seed(seed)
    m = build_model(ModelConfig(arch="rwkv", n_items=n_items, d_model=d, n_layers=layers, dropout=0.0))
    # the RWKV-4 init zeroes the output projections (each block starts as the identity): perturb them so the
    # test sees every path of the block
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.to(dtype).eval()


def _seqs(lengths, n_items, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, n_items + 1, size=n) for n in lengths]


def _close(a, b, dtype):
    err = (a - b).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, b.abs().max().item()), err


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_serving_from_the_state_equals_rerunning_the_history(dtype):
    m = _model(dtype)
    hist_lens, req_lens = [1, 17, 1000, 0], [3, 1, 5, 2]
    seqs = _seqs([h + r for h, r in zip(hist_lens, req_lens)], 80)
    full = make_jagged(seqs)
    hist = make_jagged([s[:h] for s, h in zip(seqs, hist_lens)])
    req = make_jagged([s[h:] for s, h in zip(seqs, hist_lens)])
    with torch.no_grad():
        ref = m.last_hidden(full)
        states = m.encode_history(hist)
        out = m.serve(req, caches=states)
        every = m.serve(req, caches=states, return_all=True)
        h_all = m(full)
    assert isinstance(m, RWKVRecommender) and len(states) == 2
    assert all(isinstance(s, RWKVLayerState) and s.wkv.dtype == dtype for s in states)
    assert states[0].original_length.tolist() == hist_lens
    _close(out, ref, dtype)
    req_rows = torch.cat([torch.arange(int(full.offsets[b]) + h, int(full.offsets[b + 1]))
                          for b, h in enumerate(hist_lens)])
    _close(every, h_all[req_rows], dtype)          # every request token, not only the last
    # the state is constant in the history's length: 1 token and 1,000 tokens take the same bytes
    nb = sum(s.nbytes_per_user() for s in states)
    assert nb.tolist() == [2 * (4 + 5 * 24 * torch.empty(0, dtype=dtype).element_size())] * 4
    for s in states:
        s.check_contents()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_appending_requests_to_a_state_equals_recompute(dtype):
    m = _model(dtype, seed=1)
    seqs = _seqs([30, 17, 4], 80, seed=1)
    cuts = [(10, 25), (0, 1), (2, 3)]
    with torch.no_grad():
        states = m.encode_history(make_jagged([s[:a] for s, (a, _) in zip(seqs, cuts)]))
        h1, states = m.serve_step(make_jagged([s[a:b] for s, (a, b) in zip(seqs, cuts)]), caches=states)
        h2, states = m.serve_step(make_jagged([s[b:] for s, (_, b) in zip(seqs, cuts)]), caches=states)
        _close(h1, m.last_hidden(make_jagged([s[:b] for s, (_, b) in zip(seqs, cuts)])), dtype)
        _close(h2, m.last_hidden(make_jagged(seqs)), dtype)
        direct = m.encode_history(make_jagged(seqs))
    assert states[0].original_length.tolist() == [30, 17, 4]
    for a, b in zip(states, direct):
        _close(a.wkv[:, :2], b.wkv[:, :2], dtype)
        _close(a.wkv[:, 2], b.wkv[:, 2], dtype)
        _close(a.shift_att, b.shift_att, dtype)


def test_serialised_state_round_trips_and_serves_identically():
    m = _model()
    seqs = _seqs([40, 0], 80, seed=2)
    with torch.no_grad():
        states = m.encode_history(make_jagged(seqs))
        req = make_jagged([np.array([5, 6]), np.array([7])])
        want = m.serve(req, caches=states)
        for u in range(2):
            blob = states_to_bytes(states, u)
            assert len(blob) == sum(int(s.nbytes_per_user()[u]) for s in states) + FRAMING_BYTES
            back = states_from_bytes(blob)
            for a, b in zip(back, states):
                assert torch.equal(a.wkv[0], b.wkv[u]) and torch.equal(a.shift_ffn[0], b.shift_ffn[u])
            one = make_jagged([np.array([5, 6]) if u == 0 else np.array([7])])
            _close(m.serve(one, caches=back)[0], want[u], torch.float64)   # batch of 1 vs 2: GEMM rounding only


def _reseal(blob: bytes) -> bytes:
    return blob[:-4] + struct.pack("<I", zlib.crc32(blob[:-4]) & 0xFFFFFFFF)


def test_hostile_state_bytes_are_refused():
    states = empty_states(2, 1, 8)
    good = states_to_bytes(states, 0)
    assert states_from_bytes(good)[0].original_length.tolist() == [0]
    with pytest.raises(ValueError, match="truncated"):
        states_from_bytes(good[:10])
    with pytest.raises(ValueError, match="magic"):
        states_from_bytes(b"XXXX" + good[4:])
    with pytest.raises(ValueError, match="version"):
        states_from_bytes(good[:4] + struct.pack("<H", 9) + good[6:])
    with pytest.raises(ValueError, match="size mismatch"):
        states_from_bytes(good + b"\0")
    flipped = bytearray(good)
    flipped[30] ^= 1
    with pytest.raises(ValueError, match="CRC32"):
        states_from_bytes(bytes(flipped))
    # a header claiming 4096 layers of 65,536 channels in a small blob: refused before anything is allocated
    huge = bytearray(good)
    huge[8:16] = struct.pack("<II", 4096, 65536)
    with pytest.raises(ValueError, match="need"):
        states_from_bytes(_reseal(bytes(huge)))
    zero = bytearray(good)
    zero[8:12] = struct.pack("<I", 0)
    with pytest.raises(ValueError, match="n_layers 0"):
        states_from_bytes(_reseal(bytes(zero)))
    # contents: a non-empty user whose denominator is below 1 cannot come from any history
    w = torch.zeros(1, 3, 8)
    w[:, 1] = 0.5
    bad = [RWKVLayerState(w, torch.zeros(1, 8), torch.zeros(1, 8), torch.tensor([3], dtype=torch.int32))] * 2
    with pytest.raises(ValueError, match="b >= 1"):
        states_from_bytes(states_to_bytes(bad, 0))
    nan = states[0].wkv.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="wkv must be"):
        states_from_bytes(states_to_bytes(
            [RWKVLayerState(nan, states[0].shift_att, states[0].shift_ffn, states[0].original_length)] * 2, 0))
    with pytest.raises(TypeError, match="bytes"):
        states_from_bytes("not bytes")


@pytest.mark.needs_ext("wkv", "wkv_backward")
def test_gradients_through_the_kernel_match_the_reference_loop():
    m = _model(torch.float64, d=8, layers=2, seed=3)
    full = make_jagged(_seqs([9, 1, 4], 80, seed=3))
    grads = {}
    for backend in ("cpu", "reference"):
        m.zero_grad()
        m.backend = backend
        m(full).square().sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert grads["cpu"].keys() == grads["reference"].keys()
    assert "layers.0.time_decay" in grads["cpu"] and "layers.1.time_first" in grads["cpu"]
    for n, g in grads["cpu"].items():
        torch.testing.assert_close(g, grads["reference"][n], rtol=1e-9, atol=1e-10, msg=n)


def test_config_and_api_refusals():
    with pytest.raises(ValueError, match="arch='rwkv' has no attention heads"):
        ModelConfig(arch="rwkv", n_items=5, heads="mqa")
    with pytest.raises(ValueError, match="arch='rwkv' has no attention heads"):
        ModelConfig(arch="rwkv", n_items=5, seq_compress="linformer")
    m = _model(d=8)
    hist = make_jagged(_seqs([5], 80))
    with pytest.raises(ValueError, match="cannot be compressed"):
        m.encode_history(hist, method="h2o", budget=0.5)
    states = m.encode_history(hist)
    with pytest.raises(ValueError, match="one RWKVLayerState per layer"):
        m.serve(hist, caches=states[:1])
    with pytest.raises(ValueError, match="at least one request token"):
        m.serve(make_jagged([np.array([], dtype=np.int64)]), caches=states)
    with pytest.raises(ValueError, match="hold 1 users but the request has 2"):
        m.serve(make_jagged(_seqs([1, 1], 80)), caches=states)


def test_tiny_training_run_learns_and_checkpoints(tmp_path):
    ds = synthetic_dataset(48, 60, min_len=12, max_len=40, n_topics=4, drift=0.0, seed=0)
    mcfg = ModelConfig(arch="rwkv", d_model=16, n_layers=1, max_len=32, dropout=0.0)
    tcfg = TrainConfig(epochs=4, batch_size=16, lr=1e-2, num_negatives=16, seed=0)
    model, rep = train(ds, mcfg, tcfg, cache=str(tmp_path), progress=False, log=lambda s: None)
    losses = [p["train_loss"] for p in rep["curve"]]
    assert losses[-1] < losses[0] * 0.9, losses
    assert rep["test"]["HR@10"] > 0.3                     # random ranking: 10/60
    assert rep["checkpoint"].split("/")[-1].startswith("rwkv-")
    loaded = load_checkpoint(rep["checkpoint"])
    assert isinstance(loaded, RWKVRecommender)
    split = ds.split()
    assert evaluate(loaded, split.test, progress=False) == rep["test"]
    served = evaluate(loaded, split.test, progress=False, request_len=3)
    assert served["HR@10"] == rep["test"]["HR@10"] and served["MRR"] == pytest.approx(rep["test"]["MRR"])
