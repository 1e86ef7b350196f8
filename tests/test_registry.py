"""The backend registry (core/registry.py) and the one extension loader (core/extension.py), seen from every op
family: what is registered, how "auto" and explicit names are resolved, and that compress packs through it."""
import subprocess
from pathlib import Path

import pytest
import torch

import malloc_kernels as mk
import malloc_kernels.loss  # noqa: F401  (each family registers its backends when its package is imported)
import malloc_kernels.memory  # noqa: F401
import malloc_kernels.ops.wkv  # noqa: F401
from malloc_kernels.cache import quant
from malloc_kernels.core import extension, registry
from malloc_kernels.ops import quantize
from malloc_kernels.policies import selection

ROOT = Path(__file__).resolve().parents[1]
CPP = extension.has_op("quantize_pack")[0]


@pytest.mark.parametrize("family", registry.FAMILIES)
def test_every_family_has_an_always_available_fallback_and_auto_picks_by_priority(family):
    rows = registry.backends(family)
    assert rows and rows[-1].priority == 0 and rows[-1].devices == ("*",)
    assert registry.status(family, rows[-1].name) == (True, "")
    assert [r.priority for r in rows] == sorted((r.priority for r in rows), reverse=True)
    for r in rows:
        ok, why = registry.status(family, r.name)
        assert ok or why                           # an unavailable backend always says why
    name, _ = registry.select(family, "auto", torch.device("cpu"))
    assert name == next(r.name for r in rows if registry.usable(family, r.name, torch.device("cpu"), False)[0])


def test_unknown_and_unusable_explicit_backends_raise_naming_the_reason(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        registry.select("pkm", "gpu", torch.device("cpu"))
    if registry.status("attention", "triton")[0]:
        monkeypatch.setenv("TRITON_INTERPRET", "0")      # Triton takes CPU tensors only in its interpreter
        with pytest.raises(ValueError, match="backend='triton' cannot run this call: .*cuda tensors"):
            registry.select("attention", "triton", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='cuda' cannot run this call: .+"):
            registry.select("quantize", "cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="family must be one of"):
        registry.backends("sorting")


def test_a_backend_name_is_registered_once():
    with pytest.raises(RuntimeError, match="registered twice"):
        registry.register_backend("loss", "torch", devices=("*",), priority=0, load=lambda: None)


def test_only_the_extension_loader_imports_the_compiled_module():
    out = subprocess.run(["git", "grep", "-n", "-e", "import _C", "-e", "malloc_kernels._C\"", "-e",
                          "malloc_kernels._C'", "-e", "import malloc_kernels._C", "--", "malloc_kernels"],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode not in (0, 1):
        pytest.skip(f"git grep unavailable here: {out.stderr.strip()}")
    hits = [line for line in out.stdout.splitlines() if not line.startswith("malloc_kernels/core/extension.py")]
    assert not hits, hits


@pytest.mark.skipif(not CPP, reason="C++ extension not built")
def test_compress_packs_through_the_cpp_packer_on_cpu_tensors_bit_exactly(monkeypatch):
    assert quantize.select(torch.zeros(1, 1, 1, 8))[0] == "cpu"
    calls = []
    launcher = registry.launcher("quantize", "cpu")
    real = launcher.quantize_tensor

    def spy(*args, **kw):
        calls.append(args[2])
        return real(*args, **kw)

    monkeypatch.setattr(launcher, "quantize_tensor", spy)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 37, 16, generator=g), torch.randn(2, 2, 37, 16, generator=g)
    lengths = torch.tensor([37, 20])
    for method in ("int8", "int4", "int2", "fp8", "kivi4"):
        calls.clear()
        got = mk.compress(k, v, method, lengths=lengths)
        assert calls, f"{method}: compress did not pack through the registry's cpu packer"
        # the same cache from the PyTorch reference packer, bit for bit
        monkeypatch.setattr(launcher, "quantize_tensor", quant.quantize_tensor)
        want = mk.compress(k, v, method, lengths=lengths)
        monkeypatch.setattr(launcher, "quantize_tensor", spy)
        for f in ("k", "v", "k_scale", "k_zero", "v_scale", "v_zero"):
            a, b = getattr(got, f), getattr(want, f)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (method, f)


@pytest.mark.skipif(not CPP, reason="C++ extension not built")
def test_cpu_packer_errors_name_the_tensor():
    x = torch.randn(1, 1, 4, 8)
    x[0, 0, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="cache.k: .*NaN"):
        quantize.quantize_tensor(x, torch.tensor([[4]]), "int8", 8, name="cache.k", backend="cpu")


@pytest.mark.skipif(not extension.has_op("gather_rows")[0], reason="C++ extension not built")
def test_policy_gather_uses_the_cpp_row_gather(monkeypatch):
    """Regression: ``selection.gather_entries`` picked ``ops.cpu.gather_cache_entries`` (which takes a KVCache),
    called it with a tensor and swallowed the TypeError, so the C++ gather never ran."""
    from malloc_kernels.ops import cpu
    calls = []
    real = cpu.gather_rows
    monkeypatch.setattr(cpu, "gather_rows", lambda src, index: calls.append(src.shape) or real(src, index))
    g = torch.Generator().manual_seed(1)
    for shape in ((2, 3, 11, 5), (2, 3, 11)):
        x = torch.randn(*shape, generator=g)
        idx = torch.randint(0, 11, (2, 3, 4), generator=g)
        want = torch.gather(x, 2, idx if x.dim() == 3 else idx[..., None].expand(2, 3, 4, 5))
        assert torch.equal(selection.gather_entries(x, idx), want)
    assert len(calls) == 2
    cache = mk.compress(torch.randn(2, 2, 30, 8, generator=g), torch.randn(2, 2, 30, 8, generator=g), "recent",
                        budget=10)
    assert cache.capacity == 10 and len(calls) > 2        # the pruning policies reach it too
