"""The `fxcompile` command, run as users run it: the installed console script in a subprocess.

Outputs of compiled artifacts are compared with eager PyTorch (the oracle, DESIGN §6).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxcompile
from fxcompile import cli
from fxcompile.cli.common import parse_backend_options
from fxcompile.cli.listing import field_default
from fxcompile.numerics import max_error

from tests.cli import factories
from tests.conftest import ROOT

_SCRIPT = shutil.which("fxcompile", path=os.path.dirname(sys.executable)) or shutil.which("fxcompile")


def run(*args: str, cwd: Path = ROOT, timeout: int = 120) -> subprocess.CompletedProcess:
    assert _SCRIPT, "the fxcompile console script is not installed (pip install -e .)"
    return subprocess.run([_SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def table_rows(text: str) -> list[list[str]]:
    """Rows of the first table printed by format_table (cells split on runs of 2+ spaces); the
    table ends at the first line with another number of cells."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if re.fullmatch(r"[- ]+", ln) and "--" in ln)
    columns = len(lines[start].split())
    rows = []
    for ln in lines[start + 1:]:
        cells = re.split(r"\s{2,}", ln.strip())
        if len(cells) != columns:
            break
        rows.append(cells)
    return rows


def test_help_shows_commands_and_examples(capsys):
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for word in ("demo", "compile", "passes", "backends", "examples:"):
        assert word in result.stdout
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compile", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "package.module:factory" in out and "--report-json" in out


def test_python_dash_m_works_too():
    result = subprocess.run([sys.executable, "-m", "fxcompile", "--version"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"fxcompile {fxcompile.__version__}"


def test_passes_lists_every_pass_with_its_pipeline_position():
    result = run("passes")
    assert result.returncode == 0, result.stderr
    rows = {r[0]: r for r in table_rows(result.stdout)}
    # The command sees the built-in and plugin passes, not those the test modules register here.
    registered = [p for p in fxcompile.list_passes() if not p.fn.__module__.startswith("tests")]
    assert set(rows) == {p.name for p in registered}
    for i, name in enumerate(fxcompile.default_pipeline(), start=1):
        assert rows[name][1] == str(i)
    for info in registered:
        name, _, lossless, options, doc = rows[info.name]
        assert lossless == ("yes" if info.lossless else "no") and doc == (info.doc or "-")
        if info.options is not None:
            fields = dataclasses.fields(info.options)
            assert options == ", ".join(f"{f.name}={field_default(f)}" for f in fields)


def test_backends_reports_availability_with_reason():
    from fxcompile.backends import tensorrt
    result = run("backends")
    assert result.returncode == 0, result.stderr
    rows = {r[0]: r for r in table_rows(result.stdout)}
    # (tests in this process may register more backends than the command sees)
    assert {"eager", "onnx", "tensorrt"} <= set(rows) <= set(fxcompile.backend_names())
    assert rows["eager"][1] == "yes" and rows["onnx"][1] == "yes"
    ok, why = tensorrt.available()
    assert rows["tensorrt"][1] == ("yes" if ok else "no")
    if not ok:
        assert rows["tensorrt"][2] == why


def test_demo_runs_checks_parity_and_skips_unavailable_backends():
    from fxcompile.backends import tensorrt
    result = run("demo", "--backends", "eager,tensorrt", "--runs", "2", "--warmup", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    ok, why = tensorrt.available()
    if not ok:
        assert f"skipping backend 'tensorrt': {why}" in result.stdout
    rows = table_rows(result.stdout)
    compiled = ["eager", "tensorrt"] if ok else ["eager"]
    assert [r[:2] for r in rows] == [[m, b] for m in ("resnet_style", "bert_style")
                                     for b in ["pytorch (uncompiled)", *compiled]]
    for _model, backend, compile_s, latency, speedup, err, parity in rows:
        assert float(latency) > 0 and speedup.endswith("x")
        if backend in compiled:
            assert float(compile_s) > 0 and float(err) <= 1e-4 and parity == "ok"


def test_compile_factory_to_onnx_file_matches_eager(tmp_path):
    import onnxruntime as ort
    out, report = tmp_path / "model.onnx", tmp_path / "report.json"
    result = run("compile", "tests.cli.factories:small_convnet", "--backend", "onnx", "-o", str(out),
                 "--report-json", str(report), "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fxcompile report: SmallConvNet -> backend 'onnx'" in result.stdout
    data = json.loads(report.read_text())
    assert data["backend"] == "onnx" and data["target"] == "tests.cli.factories:small_convnet"
    assert [p["name"] for p in data["passes"]] == fxcompile.default_pipeline()
    assert all(p["max_error"] is not None and p["max_error"] <= 1e-4 for p in data["passes"])
    # The saved file, run by onnxruntime here, against the model in eager PyTorch.
    model, (x,) = factories.small_convnet()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert max_error(model(x), torch.from_numpy(got)) <= 1e-4


def test_compile_keyword_factory_without_passes(tmp_path, capsys):
    report = tmp_path / "r.json"
    status = cli.main(["compile", "tests.cli.factories:keyword_model", "--passes", "none", "--report-json", str(report)])
    assert status == 0
    assert "(no passes ran)" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["passes"] == [] and data["model"] == "KeywordModel"
    assert float(data["extra"]["max error vs original"]) <= 1e-4


def test_compile_pt2_program(tmp_path):
    model, (x,) = factories.small_convnet()
    program = tmp_path / "convnet.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(program))
    out = tmp_path / "compiled.pt2"
    result = run("compile", str(program), "--passes", "remove_noops,fold_constants", "-o", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {r[0] for r in table_rows(result.stdout)}
    assert rows == {"remove_noops", "fold_constants"}
    loaded = torch.export.load(str(out)).module()
    x2 = torch.randn_like(x)
    with torch.no_grad():
        assert max_error(model(x2), loaded(x2)) <= 1e-4


def test_bad_pass_name_is_an_error_with_a_suggestion():
    result = run("compile", "tests.cli.factories:small_convnet", "--passes", "remove_noop,fold_constants")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown pass 'remove_noop'. Did you mean 'remove_noops'?")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


# The remaining error paths run main() in this process: the same code, without a new interpreter.
@pytest.mark.parametrize("target, message", [
    ("tests.cli.factories:nope", "'tests.cli.factories' has no attribute 'nope'"),
    ("tests.cli.factories:small_convnt", "Did you mean 'small_convnet'"),
    ("tests.no_such_module:f", "no module named 'tests.no_such_module'"),
    ("tests.cli.factories:returns_a_model", "must return (model, example_inputs)"),
    ("tests.cli.factories:returns_bad_inputs", "example_inputs is a str, not a tuple"),
    ("tests.cli.factories:raises", "raised RuntimeError: weights file missing"),
    ("tests.cli.factories:A_MODEL_INSTANCE", "is a model, not a factory"),
    ("no_colon_here", "TARGET must be 'package.module:factory'"),
    ("missing.pt2", "no such file: missing.pt2"),
    ("missing.py:factory", "no such file: missing.py"),
])
def test_bad_targets_are_clear_errors(target, message, capsys):
    assert cli.main(["compile", target]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_compile_factory_from_a_python_file(capsys):
    assert cli.main(["compile", f"{ROOT / 'tests' / 'cli' / 'factories.py'}:small_convnet", "--passes", "none"]) == 0
    out = capsys.readouterr().out
    assert "fxcompile report: SmallConvNet -> backend 'eager'" in out
    assert float(re.search(r"max error vs original: (\S+)", out).group(1)) <= 1e-4


def test_unknown_backend_and_backend_option(capsys):
    assert cli.main(["compile", "tests.cli.factories:small_convnet", "--backend", "onx"]) == 2
    assert "Did you mean 'onnx'?" in capsys.readouterr().err
    assert cli.main(["compile", "tests.cli.factories:small_convnet", "--passes", "none", "-b", "onnx",
                     "-O", "thread=1"]) == 2
    assert "has no option 'thread'. Did you mean 'threads'?" in capsys.readouterr().err


def test_backend_options_are_parsed_as_literals():
    assert parse_backend_options(["threads=1", "providers=['CPUExecutionProvider']", "level=all"]) == {
        "threads": 1, "providers": ["CPUExecutionProvider"], "level": "all"}
    with pytest.raises(fxcompile.InputError):
        parse_backend_options(["novalue"])


@fxcompile.register_pass("test_cli_perturb_outputs", lossless=False)
def _perturb_outputs(gm):
    """Scale every graph output by 1.01 (a deliberately wrong, lossy rewrite)."""
    out = gm.graph.output_node()
    with gm.graph.inserting_before(out):
        scaled = [gm.graph.call_function(torch.ops.aten.mul.Tensor, (v, 1.01)) for v in out.args[0]]
    out.args = (tuple(scaled),)
    return len(scaled)


def test_demo_fails_when_parity_is_broken(capsys):
    status = cli.main(["demo", "--models", "bert_style", "--backends", "eager", "--runs", "1",
                       "--warmup", "0", "--passes", "test_cli_perturb_outputs"])
    captured = capsys.readouterr()
    assert status == 1
    (row,) = [r for r in table_rows(captured.out) if r[1] == "eager"]
    assert float(row[5]) == pytest.approx(0.01, rel=1e-3) and row[6] == "FAIL"
    assert "FAIL bert_style on eager: max error" in captured.err


def test_compile_int8_dynamic_and_static_to_onnx(tmp_path, capsys):
    import onnx
    out = tmp_path / "dyn.onnx"
    assert cli.main(["compile", "tests.cli.factories:small_convnet", "-b", "onnx", "--int8", "dynamic", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fold_fake_quant" in text and "at run time" in text
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops  # its linear layer
    model, (x,) = factories.small_convnet()
    batches = tmp_path / "batches.pt"
    torch.save([torch.randn_like(x) for _ in range(3)], batches)
    out = tmp_path / "static.onnx"
    assert cli.main(["compile", "tests.cli.factories:small_convnet", "-b", "onnx", "--int8", "static",
                     "--calibration", str(batches), "--calibration-method", "percentile", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "percentile" in text and float(re.search(r"max error vs original: (\S+)", text).group(1)) <= 0.1
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(out)).graph.node}


def test_compile_dynamic_batch_takes_calibration_batches_of_any_size(tmp_path, capsys):
    model, (x,) = factories.small_convnet()
    batches = tmp_path / "batches.pt"
    torch.save([torch.randn(n, *x.shape[1:]) for n in (5, 1, 8)], batches)
    args = ["compile", "tests.cli.factories:small_convnet", "-b", "onnx", "--int8", "static",
            "--calibration", str(batches)]
    assert cli.main(args) == 2  # the graph is static in its batch: batch 5 could never run
    assert "calibration batch 0" in capsys.readouterr().err
    out = tmp_path / "dyn.onnx"
    assert cli.main([*args, "--dynamic-batch", "16", "-o", str(out)]) == 0
    loaded = fxcompile.load(out)
    y = torch.randn(11, *x.shape[1:])
    assert fxcompile.numerics.max_error(model(y), loaded(y)) <= 0.1
    with pytest.raises(fxcompile.InputError, match="outside the range 1..16"):
        loaded(torch.randn(17, *x.shape[1:]))
    assert cli.main(["compile", "tests.cli.factories:small_convnet", "--dynamic-batch", "0"]) == 2
    assert "--dynamic-batch MAX takes the largest batch size" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--int8", "static"], "--int8 static needs --calibration FILE"),
    (["--int8", "static", "--calibration", "nope.pt"], "no such file: nope.pt"),
    (["--int8", "dynamic", "--calibration", "x.pt"], "takes no --calibration"),
    (["--int8", "dynamic", "--calibration-method", "mse"], "takes no --calibration or --calibration-method"),
    (["--int8", "dynamic", "--passes", "none"], "--int8 runs its own pipeline"),
    (["--int8", "dynamic", "-b", "tensorrt"], "activations='dynamic' is for target 'onnxruntime'"),
])
def test_compile_int8_errors(extra, message, capsys):
    assert cli.main(["compile", "tests.cli.factories:small_convnet", *extra]) == 2
    assert message in capsys.readouterr().err


def test_compile_int8_calibration_file_must_hold_a_list(tmp_path, capsys):
    path = tmp_path / "one.pt"
    torch.save(torch.randn(2, 3, 16, 16), path)
    assert cli.main(["compile", "tests.cli.factories:small_convnet", "--int8", "static", "--calibration", str(path)]) == 2
    assert "holds a Tensor; --calibration takes a list of batches" in capsys.readouterr().err


# -- mistakes in the arguments are reported before the model is imported and captured ----------
# The target 'tests.cli.factories:raises' fails as soon as it is loaded: an error about the arguments
# instead of "raised RuntimeError" shows that the arguments were checked first.
@pytest.mark.parametrize("extra, message", [
    (["-b", "onnx", "-O", "threads=abc"], "backend 'onnx': threads must be"),
    (["-b", "onnx", "-O", "graph_optimization_level=fast"], "graph_optimization_level must be one of"),
    (["-b", "eager", "-O", "channels_last=maybe"], "channels_last must be 'auto', True or False"),
    (["--calibration", "batches.pt"], "--calibration is for --int8 static"),
    (["--calibration-method", "mse"], "--calibration-method is for --int8 static"),
    (["-b", "onnx", "-o", "model.pt2"], "the onnx backend writes .onnx files; name the output model.onnx"),
    (["-b", "eager", "-o", "model.onnx"], "the eager backend writes .pt2 files; name the output model.pt2"),
    (["-b", "onnx", "-o", "model"], "the onnx backend writes .onnx files; name the output model.onnx"),
])
def test_argument_mistakes_fail_before_capture(extra, message, capsys):
    torch_level = logging.getLogger("torch").level
    assert cli.main(["compile", "tests.cli.factories:raises", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert "weights file missing" not in err
    assert logging.getLogger("torch").level == torch_level  # main() leaves logging as it was


def _unwritable_paths(tmp_path: Path, suffix: str) -> list[tuple[Path, str]]:
    """Paths (ending in ``suffix``) that cannot be written, with the reason the error must give."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    a_dir = tmp_path / f"a_dir{suffix}"
    a_dir.mkdir()
    cases = [(a_file / f"out{suffix}", "is not a folder"), (a_file / "deeper" / f"out{suffix}", "is not a folder"),
             (a_dir, "is a folder")]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((locked / f"out{suffix}", "is not writable"))
    return cases


@pytest.mark.parametrize("flag, suffix", [("-o", ".onnx"), ("--report-json", ".json")])
def test_unwritable_output_paths_fail_before_capture(flag, suffix, tmp_path, capsys):
    for path, reason in _unwritable_paths(tmp_path, suffix):
        argv = ["compile", "tests.cli.factories:raises", "-b", "onnx", flag, str(path)]
        assert cli.main(argv) == 2, path
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot write {flag} {path}: ") and reason in err, err
        assert "weights file missing" not in err


def test_output_into_new_folders_still_works(tmp_path, capsys):
    out, report = tmp_path / "new" / "deeper" / "model.pt2", tmp_path / "other" / "report.json"
    assert cli.main(["compile", "tests.cli.factories:small_convnet", "--passes", "none", "-o", str(out),
                     "--report-json", str(report)]) == 0
    assert out.is_file() and json.loads(report.read_text())["model"] == "SmallConvNet"
    model, (x,) = factories.small_convnet()
    with torch.no_grad():
        assert max_error(model(x), fxcompile.load(str(out))(x)) <= 1e-4


_DATA_DEPENDENT = '''
import torch

class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:  # data-dependent control flow: torch.export refuses it
            return y * 2
        return y

def branchy():
    return Branchy().eval(), (torch.randn(2, 4),)
'''


def test_capture_failure_shows_only_the_message(tmp_path):
    source = tmp_path / "branchy.py"
    source.write_text(_DATA_DEPENDENT)
    result = run("compile", f"{source}:branchy", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    err = result.stderr
    assert err.startswith("error: torch.export could not capture Branchy"), err
    assert f'File "{source}", line 11' in err  # the user's line is named
    assert "def forward" not in err and "torch.ops.aten" not in err, err  # no traced graph
    assert "Traceback" not in err
    verbose = run("compile", f"{source}:branchy", "--verbose", cwd=tmp_path)
    assert verbose.returncode == 2 and "torch.ops.aten.sum.default" in verbose.stderr


def test_compress_writes_the_table_the_plot_and_the_chosen_model(tmp_path, capsys):
    model, (x,) = factories.small_convnet()
    torch.save([torch.randn_like(x) for _ in range(3)], tmp_path / "data.pt")
    held_out = [torch.randn_like(x) for _ in range(32)]
    with torch.no_grad():  # labelled by the fp32 model: it scores 100
        torch.save([(b, model(b).argmax(1)) for b in held_out], tmp_path / "eval.pt")
    out = tmp_path / "out"
    argv = ["compress", "tests.cli.factories:small_convnet", "--data", str(tmp_path / "data.pt"), "--recipe",
            "prune,ptq", "--ratios", "0.5", "--eval-data", str(tmp_path / "eval.pt"), "--timing-runs", "1",
            "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    rows = table_rows(text)
    assert [r[0] for r in rows] == ["fp32", "ratio 0.5: prune", "ratio 0.5: prune > ptq *"]
    assert rows[0][1] == "100.00"
    assert {"compress.md", "compress.svg", "model.onnx"} <= {p.name for p in out.iterdir()}
    with torch.no_grad():
        assert fxcompile.load(str(out / "model.onnx"))(x).shape == model(x).shape
    # a floor no variant meets: said on stderr, exit status 1
    # --eval: the user's function; a floor no variant meets is said on stderr, exit status 1
    (tmp_path / "score.py").write_text(_SCORE)
    argv = [*argv[:argv.index("--eval-data")], "--eval", f"{tmp_path / 'score.py'}:score", "--timing-runs", "0"]
    assert cli.main([*argv, "--max-drop", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "FAIL NO variant meets the floor 99.5 (fp32 100 - max_drop 0.5); the most accurate is ratio 0.5" in err


_SCORE = """
import torch
from fxcompile.numerics import cosine
from tests.cli.factories import small_convnet

model, (x,) = small_convnet()

def score(compiled):
    with torch.no_grad():
        return 100 * cosine(model(x), compiled(x))
"""


@pytest.mark.parametrize("extra, message", [
    (["--recipe", "prune,quant"], "unknown recipe step 'quant' (step 1). Did you mean 'qat'? The steps are: prune, finetune, distill"),
    (["--step-option", "qat:epochs=2"], "--step-option takes STEP:KEY=VALUE with STEP one of the recipe's steps"),
    (["--step-option", "prune:ratio=0.9"], "the pruning target comes from ratios (--ratios)"),
    (["--max-drop", "1"], "--max-drop needs an accuracy: add --eval-data FILE"),
    (["--ratios", "0.3,half"], "--ratios takes numbers, got 'half'"),
])
def test_compress_argument_mistakes_fail_before_loading(extra, message, capsys):
    argv = ["compress", "tests.cli.factories:does_not_exist", "--data", "missing.pt", *extra]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
