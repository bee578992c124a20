"""README's promises: its set-up commands are CI's, and its examples run."""
import re
import runpy
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def python_blocks() -> list[tuple[int, str]]:
    """Every ```python block of README.md as (line number of its fence, code)."""
    readme = (ROOT / "README.md").read_text()
    return [(readme.count("\n", 0, m.start()) + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", readme, re.S | re.M)]


def test_readme_has_python_blocks_and_no_untagged_code():
    """Every code block says its language, so none escapes the run below."""
    readme = (ROOT / "README.md").read_text()
    fences = re.findall(r"^```(\S*)", readme, re.M)
    openings = fences[0::2]
    assert len(python_blocks()) >= 5 and openings.count("python") == len(python_blocks())
    assert all(openings), f"a code block without a language tag: {openings}"


@pytest.mark.parametrize("line, code", python_blocks(), ids=[f"line{line}" for line, _ in python_blocks()])
def test_readme_python_block_runs_as_written(line, code, tmp_path):
    """Each block runs on its own, as a user would paste it into a fresh interpreter, in an empty
    folder (blocks write their artifacts where they run)."""
    if "tensorrt" in code:
        from fxcompile.backends import tensorrt
        ok, why = tensorrt.available()
        if not ok:
            pytest.skip(f"the block uses the tensorrt backend: {why}")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"README.md line {line}:\n{code}\n{result.stderr[-3000:]}"


def test_ci_runs_readme_setup_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up on a fresh machine\s+```bash\n(.*?)```", readme, re.S).group(1)
    commands = [ln for ln in block.splitlines() if ln.strip()]
    assert len(commands) == 2 and commands[0].endswith("fxcompile demo")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci, f"README's command is not run by .ci/run: {command}"


def test_custom_pass_example_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_pass.py")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "relu_to_clamp" in out.stdout
    diff = float(out.stdout.strip().splitlines()[-1].split(":")[-1])
    assert diff < 1e-5


def test_hf_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["compile_hf_onnx.py", "distilbert"])
    runpy.run_path(str(ROOT / "examples" / "compile_hf_onnx.py"), run_name="__main__")
    assert (tmp_path / "distilbert.onnx").stat().st_size > 10_000
