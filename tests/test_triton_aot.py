"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90 (no GPU needed), so a kernel that stops
compiling -- or starts spilling -- fails CI. Runs a representative subset of the specialisations in a
subprocess (Triton must be in compile mode there; this test session runs the interpreter): the quantized KIVI
decode kernel (the most register-hungry decode path) and a packer. ``python -m malloc_kernels.triton.report``
compiles all of them (several minutes on a 2-core box) and writes ``benchmarks/results/triton_report.md``."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_report_subset_compiles_without_spills():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "malloc_kernels.triton.report", "--only",
                           "decode/softmax_kivi4_counts", "quantize_pack/int4_channel", "--out", "-"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sm_80" in proc.stdout and "sm_90" in proc.stdout


def test_specs_cover_every_format_and_kind():
    """The spec list (built without compiling) names every cache format, both kinds and all three dtypes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from malloc_kernels.triton.aot import collect_specs\n"
            "specs, notes = collect_specs()\nprint(' '.join(s.name for s in specs))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = proc.stdout
    for token in ("fp16", "bf16", "fp32", "int8", "fp8", "kivi4", "kivi2", "int4_token", "hstu", "softmax",
                  "decode/", "merge/", "append/", "stats/", "quantize_pack/", "mask"):
        assert token in names, token
