"""fxcompile.compress: the one-call recipe. Mistakes fail before any compile and name what to do;
every step is measured on the backend; the choice never hides a model below the accuracy floor;
the user's model is never changed."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcompile
from fxcompile.errors import BackendError, FxCompileError, InputError, PruneError
from fxcompile.numerics import cosine
from fxcompile.passes.quantize import get_state


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 16, 10)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = F.max_pool2d(torch.relu(self.c2(y)), 2)
        return self.fc(y.flatten(1))


def _setup(n_batches: int = 4):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    with torch.no_grad():
        model.b1.running_mean.uniform_(-0.2, 0.2)
        model.b1.running_var.uniform_(0.5, 1.5)
    batches = [torch.randn(8, 1, 8, 8) for _ in range(n_batches)]
    return model, batches


def _fidelity(model, x):
    """An eval_fn: 100 x the output cosine to ``model`` on ``x`` (higher is better, 100 = same)."""
    def eval_fn(compiled):
        with torch.no_grad():
            return 100 * cosine(model(x), compiled(x))
    return eval_fn


def _no_compile(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("compiled before the arguments were checked")
    monkeypatch.setattr(fxcompile, "compile", refuse)


# -- mistakes: clear errors before any work ------------------------------------------------------
@pytest.mark.parametrize("recipe, message", [
    (["prune", "distil", "ptq"], "unknown recipe step 'distil' (step 1). Did you mean 'distill'?"),
    (["quantize"], "The steps are: prune, finetune, distill, ptq, qat"),
    (["ptq", "prune"], "prune must come before quantization (ptq -> prune)"),
    (["ptq", "qat"], "the recipe quantizes twice"),
    ([], "the recipe is empty"),
    ([("prune", {"ration": 0.3})], "unknown prune option 'ration'. Did you mean 'ratio'"),
    (["finetune"], "the finetune step trains on labels: pass labels=True"),
    ([("distill", {"temprature": 4.0})], "unknown distill option 'temprature'. Did you mean 'temperature'"),
    ([("qat", {"methd": "mse"})], "unknown qat option 'methd'. Did you mean 'method'"),
    ([("distill", {"labels": True})], "the distill step's labels=True needs data items (inputs, target)"),
])
def test_bad_recipes_fail_before_compiling_and_list_the_steps(recipe, message, monkeypatch):
    model, batches = _setup()
    _no_compile(monkeypatch)
    with pytest.raises(InputError) as e:
        fxcompile.compress(model, batches[0], batches, recipe=recipe)
    assert message in str(e.value)


def test_bad_prune_option_value_and_arguments_fail_before_compiling(monkeypatch):
    model, batches = _setup()
    _no_compile(monkeypatch)
    with pytest.raises(PruneError, match="criterion must be one of"):
        fxcompile.compress(model, batches[0], batches, recipe=[("prune", {"criterion": "biggest"})])
    for kwargs, message in (({"max_drop": 1.0}, "max_drop is measured with eval_fn"),
                            ({"ratios": [0.5, 1.5]}, "each ratio must be a number in [0, 1), got 1.5"),
                            ({"target": "latency"}, "target must be one of ratio, flops, params"),
                            ({"labels": True}, "labels=True takes data items (inputs, target); item 0 is Tensor")):
        with pytest.raises(InputError) as e:
            fxcompile.compress(model, batches[0], batches, recipe=["prune", "ptq"], **kwargs)
        assert message in str(e.value), (kwargs, str(e.value))
    with pytest.raises(InputError, match="data must be a list of batches"):
        fxcompile.compress(model, batches[0], batches[0], recipe=["ptq"])
    with pytest.raises(BackendError, match="unknown backend 'onnxx'. Did you mean 'onnx'"):
        fxcompile.compress(model, batches[0], batches, backend="onnxx")


def test_eval_fn_raising_names_the_step():
    model, batches = _setup()
    calls = []

    def eval_fn(compiled):
        calls.append(compiled)
        if len(calls) == 3:  # fp32, ratio 0.5: prune, then the int8 step fails
            raise ValueError("labels missing")
        return 1.0

    with pytest.raises(InputError) as e:
        fxcompile.compress(model, batches[0], batches, eval_fn, recipe=["prune", "ptq"], timing_runs=0)
    text = str(e.value)
    assert "eval_fn raised ValueError: labels missing" in text and "'ratio 0.5: prune > ptq'" in text


def test_eval_fn_returning_nan_names_the_step():
    model, batches = _setup()
    scores = iter([90.0, float("nan")])
    with pytest.raises(InputError, match=r"eval_fn returned nan for the model after step 'ratio 0.5: prune'"):
        fxcompile.compress(model, batches[0], batches, lambda c: next(scores), recipe=["prune"], timing_runs=0)


def test_failing_step_error_names_the_step():
    model, batches = _setup()
    with pytest.raises(FxCompileError) as e:  # 'tensorrt' placement needs no GPU; an unknown target fails
        fxcompile.compress(model, batches[0], batches, recipe=["prune", ("ptq", {"target": "tpu"})],
                           timing_runs=0)
    assert "compress step 'ratio 0.5: prune > ptq'" in str(e.value)


# -- the accuracy floor ---------------------------------------------------------------------------
def test_unmeetable_max_drop_says_so_and_returns_the_most_accurate_with_numbers(tmp_path):
    model, batches = _setup()
    eval_fn = _fidelity(model, batches[0])
    with pytest.warns(UserWarning, match="NO variant meets the floor") as w:
        result = fxcompile.compress(model, batches[0], batches, eval_fn, recipe=["prune", "ptq"],
                                    ratios=[0.3, 0.6], max_drop=0.0001, timing_runs=0)
    assert result.met is False
    compressed = result.rows[1:]
    best = max(compressed, key=lambda r: r.accuracy)
    assert result.chosen is best and result.module is best.module
    assert all(r.meets_floor is False for r in compressed)
    message = next(str(m.message) for m in w if "NO variant" in str(m.message))
    assert best.label in message and f"{best.accuracy:.4g}" in message and "max_drop 0.0001" in message
    assert "NO variant meets" in result.summary()


def test_max_drop_picks_a_variant_above_the_floor():
    model, batches = _setup()
    eval_fn = _fidelity(model, batches[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a met floor warns about nothing
        result = fxcompile.compress(model, batches[0], batches, eval_fn, recipe=["prune", "ptq"],
                                    ratios=[0.0, 0.6], max_drop=5.0, timing_runs=0)
    floor = result.baseline.accuracy - 5.0
    assert result.met is True and result.floor == pytest.approx(floor)
    assert result.chosen.accuracy >= floor and result.chosen.meets_floor
    # the cheapest of those above the floor (untimed: the smallest artifact)
    ok = [r for r in result.rows[1:] if r.accuracy >= floor]
    assert result.chosen.size_bytes == min(r.size_bytes for r in ok)
    assert any(r.accuracy < floor for r in result.rows[1:]), "the test needs a variant below the floor"


# -- end to end -------------------------------------------------------------------------------
def test_prune_and_ptq_end_to_end_measures_every_step_and_leaves_the_model_alone(tmp_path):
    model, batches = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(batches[0])
    result = fxcompile.compress(model, batches[0], batches, _fidelity(model, batches[1]), recipe=["prune", "ptq"],
                                ratios=[0.3, 0.5], timing_runs=2, out=str(tmp_path / "out"))
    assert [r.label for r in result.rows] == ["fp32", "ratio 0.3: prune", "ratio 0.3: prune > ptq",
                                              "ratio 0.5: prune", "ratio 0.5: prune > ptq"]
    fp32, *_, last = result.rows
    assert result.chosen is last and result.met is None and result.module.backend == "onnx"
    assert fp32.cosine > 0.9999 and fp32.accuracy > 99.99
    for r in result.rows[1:]:
        assert r.flops < 0.8 * fp32.flops and r.params < fp32.params + 100 and r.latency_ms > 0
        assert r.module.backend == "onnx" and 0 < r.cosine <= 1.0 + 1e-9
    assert result.rows[3].flops < result.rows[1].flops  # 0.5 removes more than 0.3
    assert result.rows[2].flops == result.rows[1].flops  # quantizing keeps every conv
    for row, quantized in zip(result.rows, (False, False, True, False, True)):
        state = get_state(row.module.graph_module)
        assert (state is not None and state.folded) == quantized, row.label
    # the user's model: same weights, same answer
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(batches[0]), expected)
    names = sorted(p.rsplit("/", 1)[-1] for p in result.files)
    assert names[:2] == ["compress.md", "compress.svg"] or names == ["compress.md", "compress.png", "compress.svg"]
    table = (tmp_path / "out" / "compress.md").read_text()
    assert "ratio 0.5: prune > ptq *" in table and "| variant" in table
    assert "<polyline" in (tmp_path / "out" / "compress.svg").read_text()


def test_distill_and_qat_steps_run_and_train_the_student():
    model, batches = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fxcompile.compress(model, batches[0], batches, recipe=["prune", "distill", "qat"],
                                ratios=[0.5], epochs=2, lr=1e-2, timing_runs=0, progress=False)
    pruned, distilled, qat = result.rows[1:]
    assert distilled.cosine > pruned.cosine  # distillation pulls the pruned student back to the teacher
    assert qat.cosine > 0.5 and qat.flops == distilled.flops
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_finetune_trains_on_labels():
    model, batches = _setup()
    with torch.no_grad():
        labelled = [(x, model(x).argmax(1)) for x in batches]
    accuracy = lambda c: (c(batches[0]).argmax(1) == labelled[0][1]).float().mean().item() * 100  # noqa: E731
    result = fxcompile.compress(model, batches[0], labelled, accuracy, recipe=["prune", "finetune"],
                                labels=True, ratios=[0.6], epochs=3, lr=1e-2, timing_runs=0, progress=False)
    pruned, tuned = result.rows[1:]
    assert tuned.accuracy >= pruned.accuracy


def test_ratios_start_from_the_same_model():
    """Every ratio starts from one capture of the model: no step may change it, so the same ratio
    twice gives the same rows (distillation is seeded)."""
    model, batches = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fxcompile.compress(model, batches[0], batches, recipe=["distill", "prune", "distill"],
                                ratios=[0.5, 0.5], timing_runs=0, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    first, second = result.rows[1:4], result.rows[4:]
    assert [r.cosine for r in first] == [r.cosine for r in second]
    assert first[0].cosine < 1 - 1e-6 and first[1].flops < result.rows[0].flops
