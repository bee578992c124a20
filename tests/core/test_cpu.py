"""CPU-dependent choices are detected at run time and stated: the instruction set decides whether
int8 weights are pair-limited for onnxruntime's kernels, and reports and tables name the CPU."""
import pytest
import torch
import torch.nn as nn

import fxcompile
from fxcompile import cpu
from fxcompile.passes.quantize.state import u8s8_saturates
from fxcompile.report import machine_line

AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512_VNNI = AVX2_ONLY | {"avx512f", "avx512_vnni", "avx512_bf16"}


@pytest.fixture
def flags(monkeypatch):
    """Pretend to run on an x86 CPU with the given flags."""
    def use(value):
        monkeypatch.setattr(cpu, "cpu_flags", lambda: value)
        monkeypatch.setattr(cpu, "is_x86", lambda: True)
    return use


@pytest.mark.skipif(not cpu.is_x86(), reason="reads x86 flags from /proc/cpuinfo")
def test_the_flags_are_read_from_this_machine():
    with open("/proc/cpuinfo") as f:
        text = f.read()
    found = cpu.cpu_flags()
    assert found and all(flag in text for flag in found)
    assert ("avx2" in found) == ("avx2" in cpu.isa_summary())


def test_vnni_decides_whether_u8s8_kernels_saturate(flags):
    flags(AVX2_ONLY)
    assert u8s8_saturates()
    assert "without VNNI (avx2)" in cpu.int8_kernel_note()
    flags(AVX512_VNNI)
    assert not u8s8_saturates()
    assert "with VNNI (avx512_vnni)" in cpu.int8_kernel_note()
    flags(frozenset({"avx2", "avx_vnni"}))
    assert not u8s8_saturates()


def test_int8_weights_follow_the_detected_cpu_and_the_report_says_which(flags):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(4, 32)
    data = [torch.randn(4, 32) for _ in range(2)]
    limited = {}
    for name, value in (("avx2", AVX2_ONLY), ("vnni", AVX512_VNNI)):
        flags(value)
        fq = fxcompile.compile(model, (x,), passes=fxcompile.quantize_passes("onnxruntime", fold=False),
                               calibration_data=data)
        points = fq.graph_module.meta["fxcompile.quant"].points.values()
        limited[name] = sum(bool(getattr(p, "pair_limited", False)) for p in points)
        head = str(fq.report).split("\n")
        assert any(("without VNNI" if name == "avx2" else "with VNNI") in line for line in head), fq.report
    assert limited["avx2"] > 0 and limited["vnni"] == 0, limited


def test_measured_tables_name_the_cpu_and_its_instruction_set(flags):
    flags(AVX512_VNNI)
    line = machine_line(threads=2)
    assert cpu.cpu_name() in line and "avx512_vnni" in line and "threads 2" in line
