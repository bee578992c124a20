"""The steps of a compression recipe. Each takes the model so far (a CompiledModule on the eager
backend, or the TrainableModule distillation returns: both are what fxcompile.recompile takes) and
returns the next one; none touches the user's model, which is only ever the distillation teacher.

    prune      structured pruning (the ``prune`` pass; the recipe's ratio sets its target)
    finetune   training on the labels only: fxcompile.distill with no teacher loss
    distill    knowledge distillation from the user's model (fxcompile.distill)
    ptq        fake-quant insertion (quantize_passes) and calibration on the data's inputs
    qat        ptq, then distillation of the fake-quant graph from the float model (QAT + distill)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fxcompile.errors import InputError, suggest

STEPS = ("prune", "finetune", "distill", "ptq", "qat")
DEFAULT_RECIPE = ("prune", "distill", "ptq")
# what compress's ratios mean -> the prune option they set
TARGETS = {"ratio": "ratio", "flops": "flops_reduction", "params": "params_reduction"}
QUANTIZING = ("ptq", "qat")
_PTQ_EXTRA = ("calibration_batches", "smooth")  # ptq options besides insert_fake_quant's


@dataclass
class Job:
    """What every step may need besides the model so far: the user's model (the teacher), the
    data, and the recipe-wide training settings."""

    teacher: Any
    data: list
    labels: bool
    backend: str
    train: dict = field(default_factory=dict)   # epochs, lr, seed, progress: defaults for distill
    log: Callable[[str], None] = print

    def inputs(self) -> list:
        """The data's model inputs (its targets dropped when items are (inputs, target))."""
        return [item[0] for item in self.data] if self.labels else list(self.data)


@dataclass
class Stage:
    """The model after a step: ``module`` (what recompile takes) and whether it holds fake-quant."""

    module: Any
    quantized: bool = False


def check_recipe(recipe, labels: bool = False) -> list[tuple[str, dict]]:
    """``recipe`` (step names or (name, options) pairs) -> [(name, options)]; raises InputError
    naming the valid steps and the order they must keep, before any work is done."""
    if isinstance(recipe, (str, tuple)) and not isinstance(recipe, list):
        recipe = [recipe] if isinstance(recipe, str) or (len(recipe) == 2 and isinstance(recipe[1], dict)) \
            else list(recipe)
    steps: list[tuple[str, dict]] = []
    for i, item in enumerate(recipe):
        name, options = (item, {}) if isinstance(item, str) else (tuple(item) + (None,))[:2]
        if not isinstance(name, str) or not isinstance(options, (dict, type(None))):
            raise InputError(f"compress: recipe step {i} must be a step name or a (name, options dict) pair, "
                             f"got {item!r}; the steps are {', '.join(STEPS)}")
        if name not in STEPS:
            raise InputError(f"compress: unknown recipe step {name!r} (step {i}).{suggest(name, list(STEPS))} "
                             f"The steps are: {', '.join(STEPS)}")
        steps.append((name, dict(options or {})))
    if not steps:
        raise InputError(f"compress: the recipe is empty; give steps from {', '.join(STEPS)}")
    names = [n for n, _ in steps]
    if sum(n in QUANTIZING for n in names) > 1:
        raise InputError(f"compress: the recipe quantizes twice ({' -> '.join(names)}); use one of ptq, qat")
    first_quant = next((i for i, n in enumerate(names) if n in QUANTIZING), len(names))
    if "prune" in names[first_quant:]:
        raise InputError(f"compress: prune must come before quantization ({' -> '.join(names)}): "
                         "pruning works on the float graph")
    if "finetune" in names and not labels:
        raise InputError("compress: the finetune step trains on labels: pass labels=True (--labels on the "
                         "command line) with data items (inputs, target), or use distill")
    for name, options in steps:
        if name == "prune":
            _check_prune_options(options)
        else:
            _check_step_options(name, options, labels)
    return steps


def _ptq_keys() -> set[str]:
    from dataclasses import fields

    from fxcompile.passes.quantize import InsertFakeQuantOptions
    return {f.name for f in fields(InsertFakeQuantOptions)} - {"progress"} | set(_PTQ_EXTRA)


def _train_keys() -> set[str]:
    import inspect

    from fxcompile.train.distill import distill
    return set(inspect.signature(distill).parameters) - {"student", "teacher", "data"}


def _check_step_options(name: str, options: dict, labels: bool) -> None:
    """Option names of a training or quantizing step (fxcompile.distill's, insert_fake_quant's)."""
    known = {"finetune": _train_keys, "distill": _train_keys, "ptq": _ptq_keys,
             "qat": lambda: _train_keys() | _ptq_keys()}[name]()
    for key in options:
        if key not in known:
            raise InputError(f"compress: unknown {name} option {key!r}.{suggest(key, sorted(known))} "
                             f"The {name} options are: {', '.join(sorted(known))}")
    if options.get("labels") and not labels:
        raise InputError(f"compress: the {name} step's labels=True needs data items (inputs, target): pass "
                         "labels=True (--labels on the command line) with such data")


def _check_prune_options(options: dict) -> None:
    """The prune step's options, validated as the pass will (the ratio comes from the recipe)."""
    from dataclasses import fields

    from fxcompile.passes.prune import PruneOptions
    known = [f.name for f in fields(PruneOptions)]
    given = [k for k in TARGETS.values() if k in options]
    if given:
        raise InputError(f"compress: the pruning target comes from ratios (--ratios) and target (--target), "
                         f"not from the prune step's option {given[0]!r}: e.g. ratios=[0.3, 0.5], target='flops'")
    for key in options:
        if key not in known:
            raise InputError(f"compress: unknown prune option {key!r}.{suggest(key, known)} "
                             f"The prune options are: {', '.join(known)}")
    PruneOptions(**options).validate()


def run_step(name: str, options: dict, stage: Stage, job: Job) -> Stage:
    """One step on ``stage``: the next Stage."""
    return {"prune": _prune, "finetune": _finetune, "distill": _distill, "ptq": _ptq, "qat": _qat}[name](
        options, stage, job)


def _prune(options: dict, stage: Stage, job: Job) -> Stage:
    import fxcompile
    opts = dict(options)
    if opts.get("criterion") == "taylor" and opts.get("data") is None:
        opts["data"] = job.inputs()
    return Stage(fxcompile.recompile(stage.module, [("prune", opts)], backend="eager"), stage.quantized)


def _train(options: dict, stage: Stage, job: Job, **fixed) -> Stage:
    opts = {**job.train, **options, **fixed}
    if opts.get("labels") and not job.labels:
        raise InputError("compress: training on labels needs data items (inputs, target): pass labels=True "
                         "(--labels on the command line) with such data")
    from fxcompile.train.distill import distill
    data = job.data if opts.get("labels") else job.inputs()
    result = distill(stage.module, job.teacher, data, **opts)
    return Stage(result.module, stage.quantized)


def _finetune(options: dict, stage: Stage, job: Job) -> Stage:
    """Labels only (distill's loss_fn: cross-entropy unless the options give another)."""
    return _train(options, stage, job, logit_weight=0, feature_weight=0, labels=True)


def _distill(options: dict, stage: Stage, job: Job) -> Stage:
    return _train(options, stage, job)


def _ptq(options: dict, stage: Stage, job: Job) -> Stage:
    import fxcompile
    opts = dict(options)
    method = opts.pop("method", "minmax")
    target = opts.pop("target", "tensorrt" if job.backend == "tensorrt" else "onnxruntime")
    batches = job.inputs()[: opts.pop("calibration_batches", 32)]
    passes = fxcompile.quantize_passes(target, fold=False, method=method, **opts)
    fake_quant = fxcompile.recompile(stage.module, passes, backend="eager")
    fxcompile.calibrate(fake_quant, batches, method=method, progress=False)
    return Stage(fake_quant, quantized=True)


def _qat(options: dict, stage: Stage, job: Job) -> Stage:
    quantize = _ptq_keys()
    ptq = {k: v for k, v in options.items() if k in quantize}
    train = {k: v for k, v in options.items() if k not in quantize}
    return _train(train, _ptq(ptq, stage, job), job)
