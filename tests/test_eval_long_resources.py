"""The long harness's resource table with trained variants (``eval/long_resources.models_resources``,
``eval/long.run_long_resources``): RWKV and Reformer rows next to every base model's methods, their exact bytes,
one interleaved timing per N, the resources-only run from cached checkpoints, and clear errors on bad input."""
import json
from pathlib import Path

import pytest
import torch

from malloc_kernels.data.synthetic import synthetic_dataset
from malloc_kernels.eval.long import LongConfig, run_long_resources
from malloc_kernels.eval.long_resources import RESOURCE_METHODS, models_resources, variant_comparison
from malloc_kernels.models.config import ModelConfig
from malloc_kernels.models.factory import build_model
from malloc_kernels.models.rwkv_state import FRAMING_BYTES, states_to_bytes
from malloc_kernels.models.train import TrainConfig, train

NS = [40, 80]
D, LAYERS, HEADS = 16, 2, 2


def _model(**kw):
    return build_model(ModelConfig(n_items=120, d_model=D, n_layers=LAYERS, n_heads=HEADS, max_len=16, **kw)).eval()


@pytest.fixture(scope="module")
def variant_rows():
    torch.manual_seed(0)
    bases = {"hstu": _model(arch="hstu"), "sasrec": _model(arch="sasrec")}
    rwkv = _model(arch="rwkv")     # one model for both bases, as the long harness trains it
    variants = {"hstu": {"rwkv": rwkv, "reformer": _model(arch="hstu", seq_compress="reformer")},
                "sasrec": {"rwkv": rwkv, "reformer": _model(arch="sasrec", seq_compress="reformer")}}
    rows = models_resources(bases, variants, NS, methods=("int8", "snapkv"), request_size=4, truncate_window=16,
                            repeats=1)
    return bases, variants, rows


def _row(rows, model, method, n):
    sel = [r for r in rows if r["model"] == model and r["method"] == method and r["N"] == n]
    assert len(sel) == 1, (model, method, n, len(sel))
    return sel[0]


def test_every_variant_has_a_row_at_every_length(variant_rows):
    _, _, rows = variant_rows
    for n in NS:
        for model in ("hstu", "sasrec"):
            for method in ("native", "truncate-16", "int8", "snapkv", "reformer"):
                assert _row(rows, model, method, n)["request_ms"] > 0
        rw = _row(rows, "rwkv", "rwkv", n)      # measured once although both bases list it
        assert rw["family"] == "architecture" and rw["variant_of"] == ["hstu", "sasrec"] and rw["request_ms"] > 0
        assert _row(rows, "hstu", "reformer", n)["family"] == "sequence"
    assert {r["model"] for r in rows} == {"hstu", "sasrec", "rwkv"}


def test_rwkv_bytes_are_its_state_constant_in_n(variant_rows):
    _, variants, rows = variant_rows
    rwkv = variants["hstu"]["rwkv"]
    per_layer = 4 + 5 * D * 4      # history length int32 + WKV (a, b, p) and two shift inputs, float32 [d] each
    for n in NS:
        r = _row(rows, "rwkv", "rwkv", n)
        assert r["bytes_per_user"] == LAYERS * per_layer
        assert r["stored_entries_per_head"] == 0 and r["entries_read_per_head"] == 0
        states = rwkv.encode_history(torch.randint(1, 121, (1, n)))
        assert r["bytes_per_user"] == len(states_to_bytes(states, 0)) - FRAMING_BYTES   # the serialised state


def test_reformer_bytes_are_the_native_cache_plus_bucket_ids(variant_rows):
    _, variants, rows = variant_rows
    for arch in ("hstu", "sasrec"):
        hashes = variants[arch]["reformer"].cfg.lsh_hashes
        for n in NS:
            ref, nat = _row(rows, arch, "reformer", n), _row(rows, arch, "native", n)
            # the same KVCache of every entry (bytes as native) + one uint8 bucket id per entry, head and round
            assert ref["bytes_per_user"] == nat["bytes_per_user"] + LAYERS * HEADS * n * hashes
            assert ref["stored_entries_per_head"] == nat["stored_entries_per_head"] == n
            assert 1 <= ref["entries_read_per_head"] <= n and nat["entries_read_per_head"] == n


def test_variant_comparison_pairs_each_variant_with_its_bases_native(variant_rows):
    _, _, rows = variant_rows
    comp = variant_comparison(rows)
    assert {(c["model"], c["variant"], c["base"]) for c in comp} == {
        ("rwkv", "rwkv", "hstu"), ("rwkv", "rwkv", "sasrec"), ("hstu", "reformer", "hstu"),
        ("sasrec", "reformer", "sasrec")}
    assert len(comp) == 4 * len(NS)
    for c in comp:
        nat = _row(rows, c["base"], "native", c["N"])
        assert c["native_bytes"] == nat["bytes_per_user"] and c["native_ms"] == nat["request_ms"]
        assert c["bytes_ratio"] == c["bytes_per_user"] / nat["bytes_per_user"]
        assert c["latency_ratio"] == c["request_ms"] / nat["request_ms"]


def test_bad_input_raises_naming_the_argument(variant_rows):
    bases, variants, _ = variant_rows
    h = {"hstu": bases["hstu"]}
    small = dict(methods=(), request_size=4, truncate_window=16, repeats=1)
    with pytest.raises(ValueError, match="unknown variant 'lstm'"):
        models_resources(h, {"hstu": {"lstm": variants["hstu"]["rwkv"]}}, NS, **small)
    with pytest.raises(ValueError, match=r"variants\['hstu'\]\['reformer'\]: a reformer model has "
                                         r"seq_compress='reformer'"):
        models_resources(h, {"hstu": {"reformer": bases["hstu"]}}, NS, **small)
    with pytest.raises(ValueError, match=r"variants\['hstu'\]\['reformer'\] is a 'sasrec' model"):
        models_resources(h, {"hstu": {"reformer": variants["sasrec"]["reformer"]}}, NS, **small)
    with pytest.raises(ValueError, match="variants: base arch 'sasrec' is not among models"):
        models_resources(h, {"sasrec": {"rwkv": variants["hstu"]["rwkv"]}}, NS, **small)
    with pytest.raises(ValueError, match="must be a base model"):
        models_resources({"hstu": variants["hstu"]["reformer"]}, None, NS, **small)
    with pytest.raises(ValueError, match="models: keys must be the models' arch"):
        models_resources({"sasrec": bases["hstu"]}, None, NS, **small)
    with pytest.raises(ValueError, match="models must be a non-empty dict"):
        models_resources({}, None, NS, **small)
    with pytest.raises(ValueError, match="ns must hold at least one"):
        models_resources(h, None, [], **small)
    with pytest.raises(ValueError, match=r"ns \(each history length\) must be >= 1"):
        models_resources(h, None, [40, 0], **small)
    with pytest.raises(TypeError, match="ns must be a list"):
        models_resources(h, None, 40, **small)
    with pytest.raises(TypeError, match="request_size must be an int"):
        models_resources(h, None, NS, methods=(), request_size=4.0, truncate_window=16)
    with pytest.raises(ValueError, match="truncate_window must be >= 5"):
        models_resources(h, None, NS, methods=(), request_size=4, truncate_window=4)
    with pytest.raises(ValueError, match=r"scores 50 items, its base 120"):
        rw = build_model(ModelConfig(arch="rwkv", n_items=50, d_model=D, n_layers=LAYERS, max_len=16))
        models_resources(h, {"hstu": {"rwkv": rw}}, NS, **small)


@pytest.fixture(scope="module")
def resources_only(tmp_path_factory):
    """``run_long_resources`` on a small sequence file (no timestamps, like ML-1M in the harness): HSTU's checkpoint
    trained beforehand (so it is loaded, not retrained), SASRec and the variants not cached (freshly initialised)."""
    root = tmp_path_factory.mktemp("long_res")
    ds = synthetic_dataset(n_users=12, n_items=80, min_len=40, max_len=200, seed=3)
    data = root / "syn"
    data.mkdir()
    with open(data / "sequences.txt", "w") as f:
        for u, s in zip(ds.user_ids, ds.sequences):
            f.write(f"{u} " + " ".join(map(str, s)) + "\n")
    cfg = LongConfig(data=str(data), train_max_len=16, max_len=256, request_size=4, d_model=D,
                     methods=("kivi4",), train=TrainConfig(epochs=1), variants=("rwkv", "reformer"),
                     resources=(48, 96), out=str(root / "out"), cache=str(root / "ckpt"), progress=False)
    from malloc_kernels.data import load_dataset
    loaded = load_dataset(cfg.data)
    _, report = train(loaded, ModelConfig(arch="hstu", n_items=loaded.n_items, d_model=D, max_len=16), cfg.train,
                      cache=cfg.cache, progress=False, log=lambda m: None)
    logs = []
    result = run_long_resources(cfg, log=logs.append)
    return cfg, report, result, logs


def test_resources_only_run_writes_the_variant_rows(resources_only):
    cfg, report, result, logs = resources_only
    paths = result["paths"]
    assert all(paths[k].stat().st_size > 0 for k in ("resources_md", "resources_png", "resources_json"))
    res = json.loads(paths["resources_json"].read_text())
    src = res["meta"]["sources"]
    assert src["hstu"].endswith(report["checkpoint"].rsplit("/", 1)[-1])      # the cached checkpoint was loaded
    for name in ("sasrec", "rwkv", "hstu/reformer", "sasrec/reformer"):
        assert src[name].startswith("freshly initialised"), name
    assert "freshly initialised" in res["meta"]["note"]
    rows = res["model_rows"]
    for n in cfg.resources:
        assert _row(rows, "rwkv", "rwkv", n)["bytes_per_user"] == _row(rows, "rwkv", "rwkv", 48)["bytes_per_user"]
        for arch in ("hstu", "sasrec"):
            assert _row(rows, arch, "reformer", n)["bytes_per_user"] > _row(rows, arch, "native", n)["bytes_per_user"]
    assert len(res["variant_rows"]) == 4 * len(cfg.resources)
    md = paths["resources_md"].read_text()
    assert "### rwkv" in md and "| sequence | reformer |" in md and "Trained variants vs the native cache" in md


def test_full_long_run_with_variants_writes_their_resource_rows(resources_only):
    """``run_long`` with ``variants`` and ``resources``: the variants trained for the run (one epoch here) are
    measured in the resource table beside the base model."""
    import dataclasses
    from malloc_kernels.eval.long import run_long
    cfg = resources_only[0]
    cfg = dataclasses.replace(cfg, models=("hstu",), methods=(), resources=(48,),
                              out=str(Path(cfg.out).parent / "full"))
    result = run_long(cfg, log=lambda m: None)
    res = json.loads(result["paths"]["resources_json"].read_text())
    assert {(r["model"], r["method"]) for r in res["model_rows"]} == {
        ("hstu", "native"), ("hstu", "truncate-16"), ("hstu", "reformer"), ("rwkv", "rwkv")} | {
        ("hstu", m) for m in RESOURCE_METHODS}     # the resource table's own method grid
    for name in ("hstu", "rwkv", "hstu/reformer"):
        assert "checkpoint" in res["meta"]["sources"][name], name
    assert {(c["model"], c["base"]) for c in res["variant_rows"]} == {("rwkv", "hstu"), ("hstu", "hstu")}


def test_resources_only_needs_resources():
    with pytest.raises(ValueError, match="resources: no history lengths"):
        run_long_resources(LongConfig(data="x", resources=()))
