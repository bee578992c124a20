"""``fxcompile.distill``: train a pruned and/or fake-quant compiled graph to match the original model.

    student = fxcompile.compile(model, x, passes=[*fxcompile.default_pipeline(), ("prune", {"ratio": 0.5})])
    result = fxcompile.distill(student, model, batches, epochs=3)
    fast = fxcompile.recompile(result.module, passes=[], backend="onnx")

The loss is ``logit_weight * logits + feature_weight * features + loss_fn``: the student's outputs
against the teacher's (KL at a temperature for class logits, MSE for other outputs), its
intermediate features against the teacher's nodes they came from (graphs.py: matched by node,
pruned channels compared on the positions they kept), and the user's own term. A fake-quant
student (compiled with quantize_passes(fold=False) and calibration data) trains with its
straight-through fake-quant ops: QAT and distillation in one run. Under torchrun every rank
trains on its share of each batch in DistributedDataParallel (distributed.py).
"""
from __future__ import annotations

import copy
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from fxcompile.errors import FxCompileError, InputError
from fxcompile.signature import batch_as_call

from .checkpoint import RunState, load_checkpoint, save_checkpoint
from .distributed import collective_device, is_main, mean_across, shard, wrap
from .graphs import Feature, check_origin, select_features, student_graph, tap, teacher_graph
from .losses import LOGIT_KINDS, feature_loss, feature_scales, logit_loss
from .mixup import draw, mix_inputs, mixed_loss

TERMS = ("loss", "logit_loss", "feature_loss", "user_loss")


@dataclass
class DistillResult:
    """``module``: the trained student (a TrainableModule: ``fxcompile.recompile`` lowers it, e.g.
    with ``["fold_fake_quant"]`` for int8); ``history``: one dict per step (step, loss and its
    terms, None for a term not used, lr: the learning rate it took); ``features``: the student
    nodes the feature loss compared."""

    module: Any
    history: list[dict] = field(default_factory=list)
    features: list[str] = field(default_factory=list)


@dataclass
class DistillOptions:
    epochs: int = 1
    steps: int | None = None
    temperature: float = 2.0
    logits: str | None = "auto"
    logit_weight: float = 1.0
    feature_weight: float = 1.0
    loss_fn: Callable | None = None
    labels: bool = False
    checkpoint: str | None = None
    checkpoint_every: int = 100
    progress: bool = True
    mixup: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        if self.logits not in (*LOGIT_KINDS, None):
            raise InputError(f"distill: logits must be one of {', '.join(LOGIT_KINDS)} or None, got {self.logits!r}")
        if not self.temperature > 0:
            raise InputError(f"distill: temperature must be > 0, got {self.temperature!r}")
        if self.steps is None and not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise InputError(f"distill: epochs must be a positive int, got {self.epochs!r}")
        if self.steps is not None and not (isinstance(self.steps, int) and self.steps >= 1):
            raise InputError(f"distill: steps must be a positive int or None, got {self.steps!r}")
        if isinstance(self.mixup, bool) or not (isinstance(self.mixup, (int, float)) and self.mixup >= 0):
            raise InputError(f"distill: mixup must be a number >= 0 (0: off; the Beta(mixup, mixup) weight of "
                             f"each batch's mix, 1.0 typical), got {self.mixup!r}")
        if self.labels and self.loss_fn is None:
            self.loss_fn = _cross_entropy


def _cross_entropy(output, target):
    return F.cross_entropy(output if isinstance(output, torch.Tensor) else output[0], target)


def distill(student, teacher, data: Iterable, *, epochs: int = 1, steps: int | None = None,
            temperature: float = 2.0, logits: str | None = "auto", logit_weight: float = 1.0,
            features: Any = "auto", feature_weight: float = 1.0, loss_fn: Callable | None = None,
            labels: bool = False, optimizer: Callable | None = None, lr: float = 1e-3,
            schedule: Callable | str | None = None, seed: int = 0, progress: bool = True, mixup: float = 0.0,
            checkpoint: str | None = None, resume: bool = False, checkpoint_every: int = 100,
            learnable_scales: bool = False, device: str | torch.device | None = None) -> DistillResult:
    """Distil ``teacher`` (the original nn.Module, or a CompiledModule of it) into ``student`` (a
    pruned and/or fake-quant CompiledModule on the eager backend, or a TrainableModule) on ``data``.

    ``data``: batches like compile's calibration_data (a tensor, a tuple of positional inputs, a dict
    of keyword inputs), re-iterable for several epochs; with ``labels`` each is ``(inputs, target)``
    and ``loss_fn(student_output, target)`` (cross-entropy by default) is added; without labels a
    ``loss_fn`` gets ``(student_output, teacher_output)``. ``logits``: "kl", "mse", "auto" (KL for
    [batch, classes] outputs, else MSE) or None. ``features``: "auto" (graphs.auto_features), a list
    of student node names, or None. ``steps``: stop after this many steps (over as many epochs as
    that takes) instead of ``epochs``. ``optimizer(params)`` -> a torch optimizer (Adam at ``lr`` by
    default); ``schedule(optimizer)`` -> an LR scheduler stepped every step, or "cosine" (the LR
    falls from ``lr`` to 0 along half a cosine over the run's steps). ``mixup``: alpha > 0 blends
    each batch's floating-point inputs with a shuffled copy of it, weight ~ Beta(alpha, alpha)
    (mixup.py: the teacher labels the blends; a labels loss is blended alike; under torchrun each
    rank blends within its share, so it is not the one-process run). ``checkpoint``: a path
    written every ``checkpoint_every`` steps and at the end; ``resume`` continues from it exactly as
    an uninterrupted run would (the same data in the same order). ``learnable_scales``: train the
    fake-quant scales too (LSQ). ``device``: where to train (default: the CPU, or under nccl this
    rank's current GPU). The student is not changed: the result holds a trained copy.
    Under torch.distributed every rank passes the same ``data`` (the global batches) and takes its
    1/N of every batch (the batch size must divide; the student compiled for that share or with a
    dynamic batch); only rank 0 writes the checkpoint (give every rank the same path) and shows progress.
    """
    opts = DistillOptions(epochs, steps, temperature, logits, logit_weight, feature_weight, loss_fn, labels,
                          checkpoint, checkpoint_every, progress, mixup, seed)
    opts.validate()
    if isinstance(optimizer, torch.optim.Optimizer):
        raise InputError("distill: optimizer takes a callable params -> optimizer (e.g. "
                         "lambda p: torch.optim.SGD(p, lr=0.01)): the student's trained copy has new parameters")
    torch.manual_seed(seed)
    module, captured = student_graph(student, learnable_scales)
    t_gm, t_captured = teacher_graph(teacher, student, captured)
    check_origin(module.graph_module, t_gm, captured.model_name, t_captured.model_name)
    device = torch.device(device) if device is not None else collective_device()
    if device.type != "cpu":  # the teacher's graph shares the user's weights: move a copy
        module.to(device)
        t_gm = copy.deepcopy(t_gm).to(device)
    matched = select_features(module.graph_module, t_gm, features if feature_weight else None)
    if not (opts.logits and logit_weight) and not matched and opts.loss_fn is None:
        raise InputError("distill: nothing to train on: every loss term is off (logits, features, loss_fn)")
    params = [p for p in module.parameters() if p.requires_grad]
    opt = optimizer(params) if optimizer is not None else torch.optim.Adam(params, lr=lr)
    sched = _schedule(schedule, opt, opts, data)
    run = load_checkpoint(checkpoint, module, opt, sched) if resume and checkpoint else RunState()
    if resume and not checkpoint:
        raise InputError("distill: resume=True needs checkpoint=path")
    trainer = _Trainer(opts, module, captured, t_captured, tap(t_gm, [f.name for f in matched]), matched, opt, sched)
    trainer.device = device
    trainer.fit(data, run)
    module.eval()
    return DistillResult(module, run.history, [f.name for f in matched])


def _schedule(schedule, optimizer, opts: DistillOptions, data):
    """The LR scheduler: ``schedule(optimizer)``, or for "cosine" half a cosine from the optimizer's
    LR to 0 over the run's steps (``steps``, or ``epochs`` times the batches in ``data``)."""
    if schedule is None or callable(schedule):
        return schedule(optimizer) if schedule is not None else None
    if schedule != "cosine":
        raise InputError(f"distill: schedule must be a callable optimizer -> LR scheduler or 'cosine', got {schedule!r}")
    if opts.steps is None and not isinstance(data, Sized):
        raise InputError("distill: schedule='cosine' needs the run's length: pass steps=, or data with a len() "
                         "(a list, a DataLoader)")
    total = opts.steps if opts.steps is not None else opts.epochs * len(data)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_cosine, total=max(total, 1)))


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


class _Trainer:
    def __init__(self, opts: DistillOptions, module, captured, t_captured, teacher, features: list[Feature],
                 optimizer, schedule):
        self.opts, self.module, self.captured, self.t_captured = opts, module, captured, t_captured
        self.student = wrap(tap(module.graph_module, [f.name for f in features]))
        self.teacher, self.features = teacher.eval(), features
        self.optimizer, self.schedule = optimizer, schedule
        self.device = torch.device("cpu")

    def fit(self, data: Iterable, run: RunState) -> None:
        from tqdm.auto import tqdm
        opts = self.opts
        total = opts.steps if opts.steps is not None else (
            opts.epochs * len(data) if isinstance(data, Sized) else None)
        bar = tqdm(total=total, initial=run.step, desc="distill", unit="step", leave=False,
                   disable=not (opts.progress and is_main()))
        try:
            for epoch, index, item in _batches(data, opts, run):
                if opts.steps is not None and run.step >= opts.steps:
                    break
                record = self.step(item, index, run)
                run.step, run.epoch, run.batch = run.step + 1, epoch, index + 1
                run.history.append({"step": run.step, **record})
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4g}")
                if opts.checkpoint and run.step % opts.checkpoint_every == 0:
                    save_checkpoint(opts.checkpoint, self.module, self.optimizer, self.schedule, run)
        finally:
            bar.close()
        if opts.checkpoint and (not run.history or run.step % opts.checkpoint_every):
            save_checkpoint(opts.checkpoint, self.module, self.optimizer, self.schedule, run)

    def step(self, item, index: int, run: RunState) -> dict:
        flat, target = self.inputs(item, index)
        mix = draw(self.opts.mixup, self.opts.seed, run.step, flat) if self.opts.mixup else None
        if mix is not None:
            flat = mix_inputs(flat, *mix)
        self.optimizer.zero_grad(set_to_none=True)
        s_out, s_feats = self.student(*flat)
        with torch.no_grad():
            t_out, t_feats = self.teacher(*flat)
        t_feats = [f.select(t) for f, t in zip(self.features, t_feats)]
        if run.scales is None and self.features:  # fixed on the first batch (averaged over ranks)
            run.scales = mean_across(feature_scales(t_feats))
        terms: dict[str, torch.Tensor] = {}
        opts = self.opts
        if opts.logits and opts.logit_weight:
            terms["logit_loss"] = logit_loss(opts.logits, list(s_out), list(t_out), opts.temperature)
        if self.features:
            terms["feature_loss"] = feature_loss(list(s_feats), t_feats, run.scales or [])
        if opts.loss_fn is not None:
            output = self.captured.unflatten_outputs(s_out)
            if opts.labels and mix is not None:
                terms["user_loss"] = mixed_loss(opts.loss_fn, output, target, *mix)
            else:
                other = target if opts.labels else self.t_captured.unflatten_outputs(t_out)
                terms["user_loss"] = opts.loss_fn(output, other)
        weights = {"logit_loss": opts.logit_weight, "feature_loss": opts.feature_weight, "user_loss": 1.0}
        loss = sum(weights[k] * v for k, v in terms.items())
        if not isinstance(loss, torch.Tensor) or not torch.isfinite(loss):
            raise FxCompileError(f"distill: the loss at step {run.step + 1} (batch {index}) is {loss}: "
                                 "lower lr, or check the data and loss_fn")
        loss.backward()
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        values = mean_across([float(loss.detach())] + [float(terms[k].detach()) if k in terms else 0.0
                                                       for k in TERMS[1:]])
        return {**{k: (v if k == "loss" or k in terms else None) for k, v in zip(TERMS, values)}, "lr": lr}

    def inputs(self, item, index: int) -> tuple[list, Any]:
        """The flat inputs of batch ``index`` (this rank's share) and its target (labels=True)."""
        where = f"distill data batch {index}"
        if self.opts.labels:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise InputError(f"{where}: with labels=True each batch is a pair (inputs, target); got a "
                                 f"{type(item).__name__}{f' of {len(item)}' if isinstance(item, (tuple, list)) else ''}")
            item, target = item
        else:
            target = None
        item, target = shard((item, target), index, where)
        signature = self.captured.inputs
        try:
            args, kwargs = batch_as_call(item, index)
            flat = signature.flatten(args, kwargs)
            signature.check_shapes(flat)
        except FxCompileError as e:
            pair = isinstance(item, (tuple, list)) and len(item) == 2 and not self.opts.labels
            hint = " For (inputs, target) pairs pass labels=True." if pair else ""
            raise InputError(f"{where} does not fit the student's inputs: {e}{hint}") from None
        if self.device.type != "cpu":
            flat, target = pytree.tree_map(lambda x: x.to(self.device) if isinstance(x, torch.Tensor) else x,
                                           (flat, target))
        return flat, target


def _batches(data: Iterable, opts: DistillOptions, run: RunState):
    """(epoch, index, batch) from where ``run`` stopped: batches of the current epoch already used
    are skipped (so a resumed run sees what the uninterrupted one would)."""
    if isinstance(data, (torch.Tensor, dict)) or data is None:
        raise InputError(f"distill: data must be an iterable of batches (a list, a DataLoader), got a "
                         f"single {type(data).__name__}; wrap one batch as [batch]")
    for epoch in itertools.count(run.epoch):
        if opts.steps is None and epoch >= opts.epochs:
            return
        seen = 0
        for index, item in enumerate(data):
            seen += 1
            if epoch == run.epoch and index < run.batch:
                continue
            yield epoch, index, item
        if seen == 0:
            raise InputError(f"distill: data gave no batches in epoch {epoch + 1} (a generator is used up "
                             "after one pass: give a list or a DataLoader for several epochs)")
