"""Models and helpers shared by the quantization tests (test_quantize.py, test_calibrate.py)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn as nn

FQ_TENSOR = "aten.fake_quantize_per_tensor_affine.tensor_qparams"
FQ_CHANNEL = "aten.fake_quantize_per_channel_affine.default"
Q, DQ = "fxcompile.quantize.default", "fxcompile.dequantize.default"
INT8_KERNELS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
FLOAT_KERNELS = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "NchwcConv"}


class Mixed(nn.Module):
    """conv+BN+ReLU, a 2-D linear+ReLU, a 3-D linear, a constant-weight matmul and an
    activation x activation bmm: every op family onnxruntime has an int8 kernel for."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 16)
        self.proj = nn.Linear(4, 12)
        self.w = nn.Parameter(torch.randn(12, 6) * 0.3)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))              # [B, 8, 4, 4]
        g = torch.relu(self.fc(y.mean((2, 3))))           # [B, 16]
        t = self.proj(y.flatten(2).transpose(1, 2)[:, :, :4])  # [B, 16, 12]
        h = t @ self.w                                     # [B, 16, 6]
        a = torch.bmm(h, h.transpose(1, 2))               # [B, 16, 16]
        return g, a


class Wide(nn.Module):
    """Mostly weights: for file-size checks."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 64, 3, padding=1)
        self.fc1 = nn.Linear(64, 512)
        self.fc2 = nn.Linear(512, 512)
        self.fc3 = nn.Linear(512, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(y)))))


@pytest.fixture
def single_thread():
    """One intra-op thread: these tests run many tiny ops, and on a shared 2-core machine two
    spinning threads make them 10-100x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mixed(seed: int = 0):
    torch.manual_seed(seed)
    m = Mixed().eval()
    m.bn.running_mean.uniform_(-0.5, 0.5)
    m.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 4, 4)
    data = [torch.randn(4, 3, 4, 4) for _ in range(6)]
    return m, x, data


def optimized_ops(onnx_path: str, tmp_path) -> Counter:
    """op types of onnxruntime's optimized graph (ORT_ENABLE_ALL, CPU) for the model at the path."""
    import onnx
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def ort_outputs(path, feed: dict):
    """Run the ONNX model at ``path`` on onnxruntime CPU (one thread) with a dict of tensors."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return tuple(torch.from_numpy(o) for o in sess.run(None, {k: v.numpy() for k, v in feed.items()}))
