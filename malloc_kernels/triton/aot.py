"""Ahead-of-time compilation of the Triton kernels for real GPUs, on a machine without one.

Convention (every kernel module of ``malloc_kernels/triton/`` follows it, e.g. ``attention.py``,
``quantize_pack.py``, and the memory helper's ``pkm.py``)
----------------------------------------------------------------------------------------------------------------
A kernel module exposes ``aot_specs() -> list[AotSpec]``: the specialisations its launcher really launches (one per
combination of constexprs the API uses that matters for code generation: formats, kinds, masks, tile sizes,
warps). Build each spec from the launcher's own argument construction with ``AotSpec.from_args(name, kernel,
args, constexprs, num_warps=..., num_stages=...)`` where ``args`` maps every runtime parameter name to an example
value (a torch tensor gives its pointer type, python ints ``i32``/``i64``, floats ``fp32``) -- so the compiled
signature is exactly the launched one. Add the module's name to ``SPEC_MODULES`` below (the report imports each
lazily; a module that does not exist yet is skipped with a note). ``aot_specs()`` must not launch anything and
must work with Triton in compile mode (``TRITON_INTERPRET`` unset; the report refuses to run under the
interpreter because ``@triton.jit`` then yields interpreter objects that cannot be compiled).

Compilation: ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
options={"num_warps", "num_stages"})`` runs the whole pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin) for the
target without touching a driver. Resources come from the ptxas Triton bundles for that arch
(``triton.backends.nvidia.compiler.get_ptxas(cc)``; for sm_90 the bundled ``ptxas-blackwell``, since the older
bundled ptxas rejects Triton's PTX version) run with ``-v``: registers, spill stores/loads, stack, barriers.
Shared memory is Triton's own allocation (``metadata.shared``). Tensor-core use is read off the PTX
(``mma.sync`` on sm_80, ``wgmma.mma_async`` on sm_90).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

# Modules whose ``aot_specs()`` the report compiles.
SPEC_MODULES = (
    "malloc_kernels.triton.attention",
    "malloc_kernels.triton.quantize_pack",
    "malloc_kernels.triton.pkm",
)
ARCHS = (80, 90)

_DTYPE_CODES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
    torch.bool: "i1",
}


def type_code(value) -> str:
    """Triton signature type of an example argument value."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _DTYPE_CODES:
            raise TypeError(f"no Triton pointer type for {value.dtype}")
        return "*" + _DTYPE_CODES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


@dataclass
class AotSpec:
    """One kernel specialisation to compile: ``fn`` (a ``@triton.jit`` function), its full signature (runtime
    parameters typed, constexpr parameters marked ``"constexpr"``), constexpr values and launch options."""

    name: str
    fn: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int = 4
    num_stages: int = 2
    note: str = ""
    mma_expected: bool = True
    attrs: Dict = field(default_factory=dict)
    archs: Optional[tuple] = None   # the archs this spec is launched on (None: all); tiles may differ per arch

    @classmethod
    def from_args(cls, name, fn, args: Dict[str, object], constexprs: Dict[str, object], *, num_warps=4,
                  num_stages=2, note="", mma_expected=True):
        names = list(fn.arg_names)
        missing = [n for n in names if n not in args and n not in constexprs]
        extra = [n for n in list(args) + list(constexprs) if n not in names]
        if missing or extra:
            raise ValueError(f"spec {name}: arguments do not match {fn.__name__}'s parameters "
                             f"(missing {missing}, unknown {extra})")
        # Mirror the JIT's runtime specialisation (triton.runtime.jit / BaseBackend): an int argument equal to 1
        # becomes the constant 1 (unit strides then vectorise), ints divisible by 16 and 16-byte aligned pointers
        # get the ``tt.divisibility = 16`` hint. So the AOT binary is the one a launch with these values builds.
        # Parameters declared ``do_not_specialize`` get neither (the JIT compiles them as plain i32/i64).
        sig, attrs = {}, {}
        consts = {n: (int(v) if isinstance(v, bool) else v) for n, v in constexprs.items()}
        params = getattr(fn, "params", None) or []
        plain = {p.name for p in params if getattr(p, "do_not_specialize", False)}
        for idx, n in enumerate(names):
            if n in constexprs:
                sig[n] = "constexpr"
                continue
            v = args[n]
            if n in plain:
                sig[n] = type_code(v)
                continue
            if isinstance(v, int) and not isinstance(v, bool) and v == 1:
                sig[n] = "constexpr"
                consts[n] = 1
                continue
            sig[n] = type_code(v)
            aligned = (v.data_ptr() % 16 == 0) if isinstance(v, torch.Tensor) else \
                (isinstance(v, int) and not isinstance(v, bool) and v % 16 == 0)
            if aligned:
                attrs[(idx,)] = [["tt.divisibility", 16]]
        return cls(name, fn, sig, consts, num_warps, num_stages, note, mma_expected, attrs)


@dataclass
class AotResult:
    name: str
    arch: int
    ok: bool
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack: Optional[int] = None
    shared: Optional[int] = None
    num_warps: int = 0
    mma: Optional[bool] = None
    mma_kind: str = "-"
    mma_expected: bool = True
    note: str = ""
    error: str = ""
    mix: Optional[object] = None        # sass.LoopMix of the main loop (None: no loop / not disassembled)
    keys_per_iteration: Optional[int] = None

    @property
    def spills(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)


def _ptxas(arch: int):
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(arch).path


def ptxas_resources(ptx: str, arch: int) -> Dict[str, int]:
    """Run the bundled ptxas with ``-v`` on PTX text; parse registers, spills, stack and barriers."""
    arch_flag = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas(arch), "-v", f"-arch={arch_flag}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch_flag}:\n{log[-2000:]}")
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    st = [int(x) for x in re.findall(r"(\d+) bytes spill stores", log)]
    ld = [int(x) for x in re.findall(r"(\d+) bytes spill loads", log)]
    stack = [int(x) for x in re.findall(r"(\d+) bytes stack frame", log)]
    return dict(registers=max(regs) if regs else None, spill_stores=sum(st), spill_loads=sum(ld),
                stack=max(stack) if stack else 0)


def compile_spec(spec: AotSpec, arch: int) -> AotResult:
    """Compile one spec for ``sm_<arch>`` and measure it; compile errors are returned, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget
    res = AotResult(spec.name, arch, False, num_warps=spec.num_warps, mma_expected=spec.mma_expected,
                    note=spec.note)
    try:
        src = triton.compiler.ASTSource(spec.fn, spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        ptx = compiled.asm["ptx"]
        res.shared = int(compiled.metadata.shared)
        # sm_90 uses wgmma where the tile allows (M >= 64 per warpgroup); smaller tiles keep Ampere mma.sync
        kinds = [k for k in ("wgmma.mma_async", "mma.sync") if k in ptx]
        res.mma = bool(kinds)
        res.mma_kind = "+".join(k.split(".")[0] if k.startswith("wgmma") else k for k in kinds) or "-"
        res.__dict__.update(ptxas_resources(ptx, arch))
        res.ok = True
        from . import sass
        try:
            res.mix = sass.main_loop_mix(sass.disassemble_cubin(compiled.asm["cubin"]))
        except RuntimeError as e:  # no nvdisasm: resources only
            res.error = f"SASS not inspected: {e}"[:200]
        res.keys_per_iteration = spec.constexprs.get("BLOCK_N")
    except Exception as e:  # the report prints every failure and exits non-zero
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
    return res


def ttir(spec: AotSpec, arch: int = 90, optimize: bool = True) -> str:
    """The Triton IR of one spec for ``sm_<arch>``, as text: straight from the AST (``optimize=False``: one
    function per ``@triton.jit`` helper, nothing removed) or after Triton's TTIR passes (helpers inlined,
    canonicalised). Takes a fraction of a full compile; tests read address arithmetic and loads off it."""
    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    src = triton.compiler.ASTSource(spec.fn, spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
    options = backend.parse_options({"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)
    if optimize:
        stages = {}
        backend.add_stages(stages, options, src.language)
        module = stages["ttir"](module, {})
    return str(module)


def runtime_arg_names(spec: AotSpec) -> List[str]:
    """The spec's runtime (non-constexpr) parameters in order: the kernel's ``%argN`` in its IR."""
    return [n for n, t in spec.signature.items() if t != "constexpr"]


def collect_specs(modules=SPEC_MODULES, only: Optional[List[str]] = None):
    """``(specs, notes)``: every module's ``aot_specs()``; ``only`` filters spec names by substring."""
    import importlib
    specs, notes = [], []
    for modname in modules:
        try:
            mod = importlib.import_module(modname)
        except ImportError as e:
            notes.append(f"{modname}: not importable ({e}); skipped")
            continue
        fn = getattr(mod, "aot_specs", None)
        if fn is None:
            notes.append(f"{modname}: has no aot_specs(); skipped")
            continue
        for s in fn():
            if only is None or any(o in s.name for o in only):
                specs.append(s)
    return specs, notes
