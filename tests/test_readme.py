"""README's promises: its set-up commands are CI's, and its examples run."""
import re
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
