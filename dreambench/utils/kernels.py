"""AVX2 CPU kernels for work that must come out the same on every x86-64 machine (imports no torch)."""

from __future__ import annotations

import os
import platform
import sys

# ATen, oneDNN and MKL pick AVX-512 code where the CPU has it. Its float rounding differs from the AVX2 code's in the
# last bits, and training carries the difference on: model=toy built on an AVX-512 CPU and on an AVX2 one came out
# with other weights from the same recipe (docs/TOY_WORLD.md, "A rebuild was not the same model"), and model=tiny's
# fitted autoencoder moved the suite's pinned losses by up to 3 % (tests/conftest.py). Every x86-64 machine the
# project runs on has AVX2.
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def pin_avx2_kernels() -> bool:
    """Make this process and those it starts use the AVX2 kernels, each variable unless the user set it. torch reads
    them when it is first imported, so nothing happens (False) once it is, or on a CPU that is not x86-64."""
    if "torch" in sys.modules or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    for var, isa in AVX2.items():
        os.environ.setdefault(var, isa)
    return True
