"""One per-layer compress loop for the models and the evaluation harness (``SequentialRecommender.compress_caches``):
every layer's ``compress`` call gets its context (``layer``, ``num_layers``, ``kind``, ``scale``, the layer's
attention statistics)."""
import pytest
import torch

import malloc_kernels as mk
from malloc_kernels.eval import runner
from malloc_kernels.eval.methods import MethodSpec
from malloc_kernels.models import HSTU, SASRec


def _model_and_history(ctor, n_layers=3):
    torch.manual_seed(0)
    model = ctor(40, d_model=16, n_layers=n_layers, n_heads=2).eval()
    g = torch.Generator().manual_seed(1)
    hist = torch.randint(1, 41, (2, 30), generator=g)
    ts = torch.arange(60).view(2, 30) * 50
    return model, hist, ts, torch.tensor([30, 22])


@pytest.mark.parametrize("ctor", [HSTU, SASRec], ids=["hstu", "sasrec"])
def test_pyramidkv_served_from_a_model_gets_per_layer_budgets(ctor):
    """Regression: ``encode_history`` repeated the harness' loop without ``layer``/``num_layers``/``kind``, so
    ``pyramidkv`` (per-layer budgets) could not be served from a model."""
    model, hist, ts, lengths = _model_and_history(ctor)
    with torch.no_grad():
        caches = model.encode_history(hist, ts, lengths, method="pyramidkv", budget=0.5, stats_window=6)
        native, stats = model.encode_history(hist, ts, lengths, return_stats=True, stats_window=6)
    kept = [int(c.length.sum()) for c in caches]
    assert kept[0] > kept[-1], kept                      # the pyramid: lower layers keep more
    # the same caches as compressing each layer by hand with its context
    kind = "hstu" if model.cfg.arch == "hstu" else "softmax"
    for li, c in enumerate(native):
        want = mk.compress(c.k, c.v, "pyramidkv", budget=0.5, positions=c.position, timestamps=c.timestamp,
                           lengths=c.length[:, 0], stats=stats[li], layer=li, num_layers=len(native), kind=kind,
                           scale=model.scale)
        assert torch.equal(caches[li].length, want.length) and torch.equal(caches[li].position, want.position)
        assert torch.equal(caches[li].original_length, c.original_length)


def test_the_harness_compresses_through_the_models_loop(monkeypatch):
    model, hist, ts, lengths = _model_and_history(HSTU, n_layers=2)
    with torch.no_grad():
        native, stats = model.encode_history(hist, ts, lengths, return_stats=True, stats_window=6)
    seen = []
    real = type(model).compress_caches

    def spy(self, caches, method, **kw):
        seen.append(method)
        return real(self, caches, method, **kw)

    monkeypatch.setattr(type(model), "compress_caches", spy)
    spec = MethodSpec("pyramidkv", "pruning", "pyramidkv", 0.5, "50%")
    out = runner._compress_caches(model, native, stats, spec, seed=0)
    assert seen == ["pyramidkv"] and len(out) == 2
