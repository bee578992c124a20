"""Distillation losses: the student's outputs against the teacher's (logits), and its matched
intermediate features against the teacher's kept positions."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxcompile.errors import InputError

LOGIT_KINDS = ("auto", "kl", "mse")


def output_kind(kind: str, value: torch.Tensor) -> str:
    """"auto": KL for [batch, classes] outputs (class logits), MSE for any other shape (regression
    outputs, hidden states and embeddings, where every element is a value to match)."""
    if kind != "auto":
        return kind
    return "kl" if value.dim() == 2 and value.shape[1] > 1 else "mse"


def logit_loss(kind: str, student: list, teacher: list, temperature: float) -> torch.Tensor:
    """The mean over the floating-point outputs of KL(teacher || student) at ``temperature``
    (times temperature², Hinton et al.: gradients keep their size as T changes) or MSE."""
    losses = []
    for i, (s, t) in enumerate(zip(student, teacher)):
        if not isinstance(s, torch.Tensor) or not s.is_floating_point():
            continue
        if not isinstance(t, torch.Tensor) or s.shape != t.shape:
            raise InputError(f"distill: output {i} of the student is {tuple(s.shape)} but the teacher's is "
                             f"{tuple(getattr(t, 'shape', ()))}; the logit loss compares outputs of one shape "
                             "(pass logits=None to leave it out)")
        if output_kind(kind, s) == "kl":
            s2, t2 = s.reshape(-1, s.shape[-1]) / temperature, t.reshape(-1, t.shape[-1]) / temperature
            kl = F.kl_div(F.log_softmax(s2, -1), F.log_softmax(t2, -1), log_target=True, reduction="batchmean")
            losses.append(kl * temperature ** 2)
        else:
            losses.append(F.mse_loss(s, t))
    if not losses:
        raise InputError("distill: the model has no floating-point output to distill; pass logits=None")
    return torch.stack(losses).mean()


def feature_scales(teacher_features: list[torch.Tensor]) -> list[float]:
    """Each feature's mean square on the teacher: its MSE is divided by it, so every layer weighs
    the same whatever the size of its activations."""
    return [max(float(t.detach().double().pow(2).mean()), 1e-12) for t in teacher_features]


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], scales: list[float]) -> torch.Tensor:
    """Mean over features of MSE(student, teacher's kept positions) / the feature's scale."""
    losses = [F.mse_loss(s, t) / scale for s, t, scale in zip(student, teacher, scales)]
    return torch.stack(losses).mean()
