"""Our own CPU kernels (C++ with AVX2), compiled once per machine with its g++ on first use.

When the build is impossible (no compiler, no AVX2, TOKENMILL_KERNELS=0) the layers fall back to plain
PyTorch that computes the same numbers, only slower; `kernels_available()` says which path runs.

On a CPU with AVX-512 VNNI (vpdpbusd: four byte products added into an int32 lane in one instruction) the
same sources build with it, and the integer tiles use it; the sums are exact either way, so both builds give
the same numbers bit for bit. TOKENMILL_ISA=avx2 asks for the AVX2 build on such a CPU.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCES = [
    Path(__file__).with_name(name)
    for name in ("cpu_linear.cpp", "cpu_ops.cpp", "cpu_attention.cpp", "cpu_decode.cpp", "cpu_prefill.cpp")
]
HEADERS = [Path(__file__).with_name(name) for name in ("simd.h", "kernels.h")]
ISA_FLAGS = {"avx2": [], "avx512vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next(
        (set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set()
    )


@cache
def kernel_isa() -> str:
    """The instruction set the kernels are built for: avx512vnni where the CPU has it, else avx2."""
    wanted = os.environ.get("TOKENMILL_ISA", "auto")
    if wanted not in ("auto", *ISA_FLAGS):
        raise ValueError(f"TOKENMILL_ISA must be auto or one of {sorted(ISA_FLAGS)}, not {wanted!r}")
    vnni = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= _cpu_flags()
    if wanted == "auto":
        return "avx512vnni" if vnni else "avx2"
    if wanted == "avx512vnni" and not vnni:
        raise ValueError("TOKENMILL_ISA=avx512vnni, but this CPU lacks AVX-512 VNNI")
    return wanted


def kernel_build() -> str:
    """What computes for the benchmarks' reports: the kernels' ISA, or the PyTorch fallback."""
    return kernel_isa() if kernels_available() else "pytorch fallback"


def _headers_flag() -> str:
    """torch rebuilds when a source or a flag changes, not a header: the headers' hash rides in a flag."""
    digest = hashlib.sha1(b"".join(header.read_bytes() for header in HEADERS)).hexdigest()[:12]
    return f"-DTOKENMILL_HEADERS_{digest}"


@cache
def kernels_available() -> bool:
    """Build (or reuse the cached build of) the kernels; False means use the PyTorch fallback."""
    if os.environ.get("TOKENMILL_KERNELS", "1") == "0":
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.warning("CPU lacks AVX2: using PyTorch fallbacks for quantised linear layers")
        return False
    isa = kernel_isa()  # a bad TOKENMILL_ISA is the user's error to see, not a reason to fall back
    try:
        from torch.utils.cpp_extension import load

        log.info(
            "building tokenmill CPU kernels for %s (first use on this machine takes about a minute)", isa
        )
        load(
            name=f"tokenmill_cpu_kernels_{isa}",
            sources=[str(source) for source in SOURCES],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", *ISA_FLAGS[isa], "-fopenmp", _headers_flag()],
            extra_ldflags=["-fopenmp"],  # at::parallel_for is inline: without OpenMP it runs serially
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # a compiler problem must not stop the engine: fall back
        log.warning("could not build tokenmill CPU kernels (%s); using PyTorch fallbacks", error)
        return False
    return True
