"""Warm-starting head/sequence variants from a trained base (models/uptrain.py): exact conversions where the math
says the variant can represent the base, fresh parameters reported, bad pairs rejected, checkpoint keys separated."""
import pytest
import torch

from malloc_kernels.data import synthetic_dataset
from malloc_kernels.models import ModelConfig, SequentialRecommender
from malloc_kernels.models.train import TrainConfig, checkpoint_key, train
from malloc_kernels.models.uptrain import warm_start

N_ITEMS = 30


def _model(arch, **kw):
    kw.setdefault("n_heads", 2)
    cfg = ModelConfig(arch=arch, n_items=N_ITEMS, d_model=12, n_layers=2, max_len=32, dropout=0.0, **kw)
    return SequentialRecommender(cfg).double().eval()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([17, 1, 9, 32])
    items = torch.randint(1, N_ITEMS + 1, (4, 32), generator=g)
    items[torch.arange(32)[None, :] >= lengths[:, None]] = 0
    return items, lengths


def _hidden(model):
    items, lengths = _batch()
    with torch.no_grad():
        return model.last_hidden(items, lengths=lengths)


@pytest.mark.parametrize("arch", ["sasrec", "hstu"])
def test_gqa_mean_pooling_is_exact_when_group_heads_agree(arch):
    torch.manual_seed(1)
    base = _model(arch, n_heads=4, head_dim=3)
    H, D = 4, 3
    with torch.no_grad():  # make heads 0/1 and 2/3 share key and value projections: pooling then loses nothing
        for layer in base.layers:
            W, b = layer.qkv.proj.weight, layer.qkv.proj.bias
            start = W.shape[0] - 2 * H * D
            for off in (start, start + H * D):
                for g in range(2):
                    src = slice(off + 2 * g * D, off + (2 * g + 1) * D)
                    dst = slice(off + (2 * g + 1) * D, off + (2 * g + 2) * D)
                    W[dst], b[dst] = W[src], b[src]
    torch.manual_seed(2)
    gqa = _model(arch, n_heads=4, head_dim=3, heads="gqa", n_kv_heads=2)
    assert warm_start(gqa, base) == []
    torch.testing.assert_close(_hidden(gqa), _hidden(base), rtol=1e-10, atol=1e-10)


def test_gqa_pools_the_mean_of_each_group():
    torch.manual_seed(3)
    base = _model("sasrec", n_heads=4, head_dim=3)
    mqa = _model("sasrec", n_heads=4, head_dim=3, heads="mqa")
    warm_start(mqa, base)
    W = base.layers[0].qkv.proj.weight
    k_heads = W[12:24].reshape(4, 3, 12)
    torch.testing.assert_close(mqa.layers[0].qkv.proj.weight[12:15], k_heads.mean(0))


def test_mla_full_rank_svd_reproduces_sasrec():
    torch.manual_seed(4)
    base = _model("sasrec")  # d=12, 2 heads x 6: the affine map [W_k; W_v | b] has rank <= 13
    mla = _model("sasrec", heads="mla", latent_dim=13)
    assert warm_start(mla, base) == []
    torch.testing.assert_close(_hidden(mla), _hidden(base), rtol=1e-9, atol=1e-9)
    low = _model("sasrec", heads="mla", latent_dim=4)  # truncated: close to, not equal to, the base
    warm_start(low, base)
    assert not torch.allclose(_hidden(low), _hidden(base), atol=1e-6)


@pytest.mark.parametrize("seq,fresh", [("linformer", ["lin_logits"]), ("beacon", ["beacon_emb"])])
def test_sequence_variants_keep_every_base_weight(seq, fresh):
    torch.manual_seed(5)
    base = _model("hstu")
    var = _model("hstu", seq_compress=seq)
    assert warm_start(var, base) == fresh
    for name, t in base.state_dict().items():
        torch.testing.assert_close(var.state_dict()[name], t, rtol=0, atol=0)


def test_rejects_mismatched_pairs():
    base = _model("hstu")
    with pytest.raises(ValueError, match="d_model"):
        warm_start(SequentialRecommender(ModelConfig(arch="hstu", n_items=N_ITEMS, d_model=16, max_len=32)), base)
    with pytest.raises(ValueError, match="arch"):
        warm_start(_model("sasrec"), base)
    with pytest.raises(ValueError, match="base must be"):
        warm_start(_model("hstu"), _model("hstu", heads="mqa"))


def test_train_warm_start_keys_and_arguments(tmp_path):
    ds = synthetic_dataset(n_users=24, n_items=N_ITEMS, min_len=4, max_len=20, n_topics=4, seed=0)
    base_cfg = ModelConfig(arch="hstu", n_items=ds.n_items, d_model=12, max_len=16)
    tcfg = TrainConfig(epochs=1, batch_size=8, num_negatives=8)
    base, _ = train(ds, base_cfg, tcfg, cache=str(tmp_path), progress=False, log=lambda s: None)
    mqa_cfg = ModelConfig(arch="hstu", n_items=ds.n_items, d_model=12, max_len=16, heads="mqa")
    up = TrainConfig(epochs=1, batch_size=8, num_negatives=8, init_from="hstu-base")
    assert checkpoint_key(mqa_cfg, up, "x") != checkpoint_key(mqa_cfg, tcfg, "x")
    with pytest.raises(ValueError, match="init_from"):
        train(ds, mqa_cfg, up, cache=str(tmp_path), progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="init_from"):
        train(ds, mqa_cfg, tcfg, cache=str(tmp_path), progress=False, log=lambda s: None, init_model=base)
    model, report = train(ds, mqa_cfg, up, cache=str(tmp_path), progress=False, log=lambda s: None,
                          init_model=base)
    assert report["train"]["init_from"] == "hstu-base"
    assert model.cfg.n_kv_heads == 1


def test_cosine_schedule_warms_up_and_decays_to_zero():
    t = TrainConfig(lr=1e-2, schedule="cosine", warmup_steps=4)
    assert t.lr_at(0, 100) == pytest.approx(2.5e-3)
    assert t.lr_at(3, 100) == pytest.approx(1e-2)
    assert t.lr_at(4, 100) == pytest.approx(1e-2)
    assert t.lr_at(52, 100) == pytest.approx(5e-3)
    assert t.lr_at(100, 100) == pytest.approx(0.0, abs=1e-12)
    assert TrainConfig(lr=1e-2).lr_at(77, 100) == 1e-2
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")
    a = TrainConfig(schedule="cosine", epochs=10)
    assert checkpoint_key(ModelConfig(n_items=5), a, "x") != checkpoint_key(
        ModelConfig(n_items=5), TrainConfig(schedule="cosine", epochs=12), "x")
    assert checkpoint_key(ModelConfig(n_items=5), TrainConfig(epochs=10), "x") == checkpoint_key(
        ModelConfig(n_items=5), TrainConfig(epochs=12), "x")


def test_cosine_time_schedule_follows_the_clock_or_the_steps_whichever_is_further():
    t = TrainConfig(lr=1e-2, schedule="cosine-time", warmup_steps=0, time_budget_min=10.0)
    assert t.lr_at(0, 100, elapsed_seconds=0.0) == pytest.approx(1e-2)
    assert t.lr_at(10, 100, elapsed_seconds=300.0) == pytest.approx(5e-3)  # half the budget, 10% of the steps
    assert t.lr_at(50, 100, elapsed_seconds=6.0) == pytest.approx(5e-3)  # half the steps, 1% of the budget
    assert t.lr_at(10, 100, elapsed_seconds=900.0) == pytest.approx(0.0, abs=1e-12)  # past the budget
    with pytest.raises(ValueError, match="time_budget_min"):
        TrainConfig(schedule="cosine-time")
    keys = {checkpoint_key(ModelConfig(n_items=5), TrainConfig(schedule="cosine-time", time_budget_min=m), "x")
            for m in (10.0, 20.0)}
    assert len(keys) == 2  # the budget shapes the weights
    assert checkpoint_key(ModelConfig(n_items=5), TrainConfig(schedule="cosine", time_budget_min=10.0), "x") == \
        checkpoint_key(ModelConfig(n_items=5), TrainConfig(schedule="cosine", time_budget_min=20.0), "x")


def test_train_config_rejects_bad_values_and_eval_every_zero_validates_after_the_last_epoch(tmp_path):
    for bad in (dict(eval_every=-1), dict(epochs=0), dict(batch_size=0), dict(lr=0.0), dict(num_negatives=0),
                dict(time_budget_min=-1.0), dict(weight_decay=float("nan")), dict(warmup_steps=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)
    ds = synthetic_dataset(n_users=24, n_items=N_ITEMS, min_len=4, max_len=20, n_topics=4, seed=0)
    cfg = ModelConfig(arch="sasrec", n_items=ds.n_items, d_model=8, n_layers=1, n_heads=1, max_len=16)
    _, report = train(ds, cfg, TrainConfig(epochs=2, batch_size=8, num_negatives=4, eval_every=0),
                      cache=str(tmp_path), progress=False, log=lambda s: None)
    assert ["valid" in p for p in report["curve"]] == [False, True]


def test_cpu_budget_clock_is_not_consumed_by_sleeping_but_the_wall_clock_is(tmp_path):
    """The same tiny run with a log hook that sleeps 2.6 s after epoch 1 and a 2.4 s budget: on the wall clock the
    sleep uses the budget up (stopped at the first step of epoch 2); on the CPU clock it costs nothing (both
    epochs run; their compute is far below 2.4 CPU seconds)."""
    import time

    def hook(msg):
        if msg.startswith("epoch 1.00"):
            time.sleep(2.6)

    ds = synthetic_dataset(n_users=24, n_items=N_ITEMS, min_len=4, max_len=20, n_topics=4, seed=0)
    cfg = ModelConfig(arch="sasrec", n_items=ds.n_items, d_model=8, n_layers=1, n_heads=1, max_len=16)
    curves = {}
    for clock in ("wall", "cpu"):
        tc = TrainConfig(epochs=2, batch_size=8, num_negatives=4, eval_every=0, time_budget_min=0.04,
                         budget_clock=clock)
        _, report = train(ds, cfg, tc, cache=str(tmp_path), progress=False, log=hook)
        assert report["budget_clock"] == clock
        curves[clock] = report["curve"]
    assert len(curves["wall"]) == 2 and 1 < curves["wall"][-1]["epoch"] < 2
    w = curves["wall"][-1]
    assert w["train_seconds"] == pytest.approx(w["wall_seconds"], abs=0.05) and w["wall_seconds"] > 2.4
    assert w["steps"] == 3 + 1   # 24 users in batches of 8: epoch 1, then one step
    assert [p["epoch"] for p in curves["cpu"]] == [1, 2]
    c = curves["cpu"][-1]
    assert c["train_seconds"] == pytest.approx(c["cpu_seconds"], abs=0.05)
    assert c["cpu_seconds"] < 2.4 < c["wall_seconds"] and c["steps"] == 2 * 3


def test_budget_clock_is_validated_and_a_cpu_budget_keys_its_own_checkpoints():
    with pytest.raises(ValueError, match="budget_clock"):
        TrainConfig(budget_clock="gpu")
    key = lambda **kw: checkpoint_key(ModelConfig(n_items=5), TrainConfig(schedule="cosine", **kw), "x")  # noqa
    assert key() == key(budget_clock="wall")   # wall-clock checkpoints keep their keys
    assert key(budget_clock="cpu") != key()
