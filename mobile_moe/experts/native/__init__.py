"""The project's own CPU kernels (C++ beside this file), built once per machine by torch's extension builder and cached.

torch's int4 CPU kernel converts every code to float and is compute-bound (~11 GB/s per core on AVX512 at OLMoE's
widths, docs/performance.md); `tiled.cpp` reads the same bytes with one bf16 dot-product instruction per 32 int4
weights (per 16 int8 weights, whose nibbles it takes apart the same way). It is built on first use into the
compiled-code cache (`$MOBILE_MOE_COMPILED_DIR`, else the user cache dir's mobile-moe/compiled; `off`: never built,
torch's kernels run), with a progress line, and loaded from there by every later process. The library takes its
AVX512-BF16 path where the CPU has it, else AVX2 (activations quantized to int8 per 32 columns). Where it cannot be built (no compiler) or torch runs below
AVX2, torch's kernels run; so they do with $MOBILE_MOE_NATIVE_KERNELS=off (read when a model loads).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

log = logging.getLogger("mobile_moe")
NATIVE_ENV = "MOBILE_MOE_NATIVE_KERNELS"  # `off`: torch's kernels only (read when a model loads)
CACHE_ENV = "MOBILE_MOE_COMPILED_DIR"  # where compiled code lives (default: the user cache dir's mobile-moe/compiled; `off`: none)
SOURCE = Path(__file__).with_name("tiled.cpp")
NAMESPACE = "mobile_moe_native"
FLAGS = ["-O3", "-fopenmp"]  # OpenMP: torch's parallel_for runs on torch's own thread pool only when compiled with it


def cache_dir() -> Path | None:
    """The directory of compiled code: $MOBILE_MOE_COMPILED_DIR, else $XDG_CACHE_HOME (or ~/.cache)/mobile-moe/compiled;
    None when that variable is `off` (nothing is compiled)."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen == "off":
        return None
    if chosen:
        return Path(chosen).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mobile-moe" / "compiled"


def tiled_supported() -> bool:
    """Whether the tiled kernels run here: torch's CPU kernels run AVX2 or AVX512 (the kernels take AVX512-BF16 where the
    CPU has it and ATEN_CPU_CAPABILITY does not lower it, else AVX2 on int8-quantized activations)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def avx512_path() -> bool:
    """Whether the library takes its AVX512-BF16 path (as it decides when it loads), rather than its AVX2 path."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def loaded() -> bool:
    """Whether this process has the kernels registered."""
    return hasattr(getattr(torch.ops, NAMESPACE), "int4_tiles_mm")


def tiled_ops() -> object | None:
    """The tiled kernels (`torch.ops.mobile_moe_native`: int4_tiles_mm, int4_tiles_experts, int8_tiles_mm,
    int8_tiles_experts), built on first use; None where they cannot run."""
    if os.environ.get(NATIVE_ENV) == "off" or cache_dir() is None or not tiled_supported():  # cache `off`: no compiled code at all
        return None
    if not loaded() and not build_and_load():
        return None
    return getattr(torch.ops, NAMESPACE)


def build_and_load() -> bool:
    """Build the kernels into the cache (once per machine and source) and register them in this process."""
    root = cache_dir()
    if root is None:
        return False
    key = hashlib.sha256(b"\0".join([torch.__version__.encode(), SOURCE.read_bytes(), " ".join(FLAGS).encode()])).hexdigest()[:16]
    name, directory = f"{NAMESPACE}_{key}", root / f"native-{key}"
    if not (directory / f"{name}.so").exists():
        print(f"mobile-moe: building the int4/int8 CPU kernels once for this machine ... (cached in {directory})", file=sys.stderr, flush=True)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        extension = _extension_builder()
        extension.load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], build_directory=str(directory), is_python_module=False)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        log.warning("the int4/int8 CPU kernels could not be built (%s); torch's kernels run instead", reason)
        return False
    return loaded()


def _extension_builder():  # noqa: ANN202 - torch.utils.cpp_extension, imported only to build or load
    """torch's C++ extension builder, imported without its CUDA-toolkit notice (no CUDA code is built here)."""
    notices = logging.getLogger("torch.utils.cpp_extension")
    level = notices.level
    notices.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        notices.setLevel(level)
    return cpp_extension
