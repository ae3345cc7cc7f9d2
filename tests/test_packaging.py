"""CI runs .ci/run, which must end with exactly the test command the README gives."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in first_block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_two_fresh_machine_commands():
    setup, tests = _readme_commands()
    assert setup.startswith("python3 -m venv .venv") and "pip install torch==2.13.0" in setup
    assert "accelerate launch examples/" in setup
    assert tests.startswith("python3 -m venv .venv") and tests.endswith("python -m pytest -q")


def test_ci_runs_exactly_the_readme_test_command():
    """Then one more step: the opt-in DeepSpeed ZeRO-3 tests, with deepspeed installed into the same venv."""
    ci_lines = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    assert ci_lines[0] == _readme_commands()[1]
    assert ci_lines[1:] == ['. .venv/bin/activate && pip install -e ".[deepspeed]" && HF_EMERGENCE_TEST_DEEPSPEED=1 '
                            'python -m pytest -q tests/test_distributed.py -k zero3']


def test_the_console_script_entry_point_is_the_cli_main():
    from hf_emergence.cli import main

    setup_py = (ROOT / "setup.py").read_text()
    target = re.search(r'"hf-emergence=([\w.]+):(\w+)"', setup_py)
    module = __import__(target.group(1), fromlist=[target.group(2)])
    assert getattr(module, target.group(2)) is main
