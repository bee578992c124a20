"""Training on compiled graphs: knowledge distillation and distributed (DDP) training.

    result = fxcompile.distill(student, teacher, data, epochs=3)   # distill.py
    result.module                                                   # the trained graph

Under ``torchrun --nproc-per-node N`` the same call trains on every rank (distributed.py);
``is_main()`` says whether this process is the one that writes files (rank 0).
"""
from .distill import DistillResult, distill
from .distributed import is_main, world

__all__ = ["distill", "DistillResult", "is_main", "world"]
