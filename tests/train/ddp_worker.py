"""One rank of the distributed tests, run under ``torchrun --nproc-per-node 2`` (gloo) or in-process
as a single rank: QAT + distillation of a pruned digits CNN on global batches of 16, each rank
calibrating and training on its half. Writes what it computed to ``OUT/rank{rank}.pt``."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

GLOBAL_BATCH = 16


def run(out: str) -> dict:
    import fxcompile
    from fxcompile.passes.quantize.state import get_state
    from fxcompile.train.distributed import shard, world
    from tests.train.models import batches, pruned_fake_quant, seeded_cnn

    torch.set_num_threads(1)
    rank, size = world()
    model = seeded_cnn()
    x = torch.rand(96, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    data = batches(x, GLOBAL_BATCH)
    mine = [shard(b, i) for i, b in enumerate(data)]  # what this rank calibrates on
    student = pruned_fake_quant(model, mine[0], mine)
    ranges = {p.name: (p.lo, p.hi) for p in get_state(student.graph_module).activations()}
    by_percentile = pruned_fake_quant(model, mine[0], mine, method="percentile")
    percentile = {p.name: (p.lo, p.hi) for p in get_state(by_percentile.graph_module).activations()}
    result = fxcompile.distill(student, model, data, epochs=2, seed=0, progress=False,
                               checkpoint=os.path.join(out, f"checkpoint-{rank}.pt"), checkpoint_every=4)
    found = {"ranges": ranges, "percentile": percentile, "history": result.history,
             "state": {k: v.detach().clone() for k, v in result.module.state_dict().items()}}
    torch.save(found, os.path.join(out, f"rank{rank}.pt"))
    return found


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        run(sys.argv[1])
    finally:
        dist.destroy_process_group()
