"""What this CPU can do, read at run time: choices that depend on the instruction set (int8
weight limits for onnxruntime's kernels) and every measured table name what they ran on.

Machines differ from run to run (AVX2-only hosts, AVX-512 VNNI/BF16 hosts, ARM), so nothing
here is decided at install time.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform

# Instruction-set extensions that matter to fxcompile's choices or to reading its benchmarks.
REPORTED = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
# x86 int8 dot-product instructions: with one of them, onnxruntime's U8S8 kernels accumulate in
# int32; without (AVX2 only: vpmaddubsw), they add pairs of products in int16 and can saturate.
VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The flags of /proc/cpuinfo's first processor (empty where the file is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def isa_summary(flags: frozenset[str] | None = None) -> str:
    """'avx2, avx512f, avx512_vnni' -- the REPORTED extensions present ('' when none)."""
    flags = cpu_flags() if flags is None else flags
    return ", ".join(f for f in REPORTED if f in flags)


def has_vnni(flags: frozenset[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in VNNI)


def conv_channel_block(flags: frozenset[str] | None = None) -> int:
    """Channels the CPU's float convolutions compute at once, read at run time: onnxruntime's
    NCHWc kernels (and torch's oneDNN ones) block channels by the fp32 lanes of a vector
    register, 16 with AVX-512F and 8 with AVX2 (8 elsewhere: also the tensor-core tile). A conv
    whose channel count is not a multiple runs padded up to one, and onnxruntime reorders its
    output back to NCHW: the digits CNN pruned 16/32 -> 11/22 channels ran its second conv as
    slowly as unpruned plus two reorders (0.81x the unpruned model); 16/16 ran it 1.5x faster."""
    flags = cpu_flags() if flags is None else flags
    return 16 if "avx512f" in flags else 8


def int8_kernel_note(flags: frozenset[str] | None = None) -> str:
    """One line saying how onnxruntime's x86 int8 kernels accumulate on this CPU, and so whether
    int8 weights are limited against int16 saturation (quantize's reduce_range="auto")."""
    if not is_x86():
        return f"{platform.machine()} CPU: no x86 int16 pair sums"
    flags = cpu_flags() if flags is None else flags
    if has_vnni(flags):
        found = ", ".join(f for f in VNNI if f in flags)
        return f"CPU with VNNI ({found}): int8 products summed in int32"
    return ("CPU without VNNI (" + (isa_summary(flags) or "no AVX2") + "): U8S8 kernels sum int8 "
            "products in int16 pairs, which 8-bit weights can saturate")


@functools.cache
def glibc_function(name: str):
    """glibc's C function ``name`` (``malloc_trim``, ``mallopt``), or None where the C library is
    not glibc (musl, macOS, Windows) or lacks it: callers then skip what it would tune."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


# glibc's mallopt parameters, and the ceiling of its dynamic mmap threshold on 64-bit systems
# (DEFAULT_MMAP_THRESHOLD_MAX: 4 MiB * sizeof(long))
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
SESSION_MMAP_THRESHOLD = 1 << 20
DYNAMIC_MMAP_THRESHOLD_MAX = 32 << 20


@contextlib.contextmanager
def large_allocations_mapped():
    """Within the block, glibc serves every allocation of SESSION_MMAP_THRESHOLD or more with a
    mapping of its own, which goes back to the OS when freed.

    For work that makes and frees one large temporary after another. onnxruntime's graph
    transformers make and free a temporary per weight they rewrite (the NCHWc
    layout of every conv weight on x86: a new filter, its TensorProto, its OrtValue). With glibc's
    default (dynamic) threshold those come from the heap once the first is freed, and the heap keeps
    their pages: a BN-folded conv stack's session peaked at +559 MB for 270 MB of conv weights,
    +307 MB with this (see tests/backends/test_backend_onnx.py). glibc cannot return to its
    dynamic threshold afterwards, so the block leaves the threshold at that dynamic threshold's
    ceiling (32 MB; trim at 64 MB), which long-running processes reach anyway. Nothing happens
    without glibc, or when the user tuned malloc (MALLOC_MMAP_THRESHOLD_, GLIBC_TUNABLES)."""
    mallopt = glibc_function("mallopt")
    tuned = "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")
    if mallopt is None or tuned:
        yield
        return
    mallopt(M_MMAP_THRESHOLD, SESSION_MMAP_THRESHOLD)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, DYNAMIC_MMAP_THRESHOLD_MAX)
        mallopt(M_TRIM_THRESHOLD, 2 * DYNAMIC_MMAP_THRESHOLD_MAX)
