"""Our own CPU kernels (C++ with AVX2), compiled once per machine with its g++ on first use.

When the build is impossible (no compiler, no AVX2, TOKENMILL_KERNELS=0) the layers fall back to plain
PyTorch that computes the same numbers, only slower; `kernels_available()` says which path runs.
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
    for name in ("cpu_linear.cpp", "cpu_ops.cpp", "cpu_attention.cpp", "cpu_decode.cpp")
]
HEADERS = [Path(__file__).with_name(name) for name in ("simd.h", "kernels.h")]


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
    try:
        from torch.utils.cpp_extension import load

        log.info("building tokenmill CPU kernels (first use on this machine takes about a minute)")
        load(
            name="tokenmill_cpu_kernels",
            sources=[str(source) for source in SOURCES],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", _headers_flag()],
            extra_ldflags=["-fopenmp"],  # at::parallel_for is inline: without OpenMP it runs serially
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # a compiler problem must not stop the engine: fall back
        log.warning("could not build tokenmill CPU kernels (%s); using PyTorch fallbacks", error)
        return False
    return True
