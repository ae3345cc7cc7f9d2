"""The offline install path of benchmarks/gpu_multi30k.sh: setup.py's ranges read by benchmarks/gpu_requirements.py,
the pins of benchmarks/fetch_gpu_wheels.sh inside them, and the script's plan when a package is missing or too old
(a fake installed version shadows the real one), without installing or training anything."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_multi30k.sh"
spec = importlib.util.spec_from_file_location("gpu_requirements", ROOT / "benchmarks" / "gpu_requirements.py")
gpu_requirements = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_requirements)


def _fetch_pins() -> dict[str, str]:
    text = (ROOT / "benchmarks" / "fetch_gpu_wheels.sh").read_text()
    body = re.search(r"^REQUIRED=\((.*?)\)", text, re.M).group(1)
    return dict(pin.split("==") for pin in body.split())


def test_setup_ranges_are_read_without_running_setup_py():
    reqs = gpu_requirements.setup_requirements()
    assert str(reqs["datasets"].specifier) == ">=3.0" and str(reqs["transformers"].specifier) == "<6,>=5.0"
    assert "torch" in reqs and "sacremoses" in reqs            # INSTALL_REQUIRES and EXAMPLES both


@pytest.mark.parametrize("installed, expected", [
    ({"transformers": "5.17.0", "datasets": "5.2.0"}, []),                                   # the device's 5.17 is in range
    ({"transformers": "4.57.0", "datasets": "5.2.0"}, ["transformers 4.57.0 (needs <6,>=5.0)"]),
    ({"transformers": "6.0.0", "datasets": None}, ["transformers 6.0.0 (needs <6,>=5.0)", "datasets (missing)"]),
])
def test_unmet_names_missing_and_out_of_range_packages(installed, expected):
    reqs = gpu_requirements.setup_requirements()
    assert gpu_requirements.unmet(list(installed), reqs, installed.get) == expected


def test_a_name_setup_py_does_not_list_is_refused():
    with pytest.raises(KeyError, match="'nonesuch' is not in setup.py"):
        gpu_requirements.unmet(["nonesuch"], gpu_requirements.setup_requirements(), lambda n: "1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_requirements.py"), "nonesuch"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: 'nonesuch' is not in setup.py")


def test_fetched_pins_satisfy_setup_py():
    """Every wheel the fetch script pins is a version setup.py accepts (those setup.py names at all)."""
    pins, reqs = _fetch_pins(), gpu_requirements.setup_requirements()
    assert {"datasets", "evaluate", "sacremoses"} <= set(pins)
    for name, version in pins.items():
        if name in reqs:
            assert reqs[name].specifier.contains(version), (name, version, reqs[name].specifier)


def test_fetch_script_refuses_a_bad_python_version(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "fetch_gpu_wheels.sh"), "3.x", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "PYTHON_VERSION must look like 3.12, got '3.x'" in proc.stderr
    assert not (tmp_path / "w").exists()


def _multi30k(tmp_path: Path) -> Path:
    data = tmp_path / "multi30k"
    data.mkdir()
    for split in ("train", "val", "test_2016_flickr"):
        for lang in ("de", "en"):
            (data / f"{split}.{lang}.gz").write_bytes(b"")
    return data


def _script_env(tmp_path: Path, wheels: Path) -> dict[str, str]:
    """sacremoses 0.0.1 shadows the real one (below setup.py's >=0.1), as on an image without it."""
    fake = tmp_path / "fake_site" / "sacremoses-0.0.1.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: sacremoses\nVersion: 0.0.1\n")
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(fake.parent), "WHEELS": str(wheels),
            "OUT": str(tmp_path / "out"), "DRY_RUN": "1"}


def test_gpu_script_without_wheels_stops_with_the_fetch_command(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), str(_multi30k(tmp_path))], env=_script_env(tmp_path, tmp_path / "none"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "sacremoses 0.0.1 (needs >=0.1)" in proc.stdout and "datasets" not in proc.stdout
    assert f"no {tmp_path / 'none'}/requirements.txt" in proc.stderr and "fetch_gpu_wheels.sh 3.12" in proc.stderr


def test_gpu_script_dry_run_plans_the_offline_install_and_the_run(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "requirements.txt").write_text("sacremoses==0.2.0\n")
    proc = subprocess.run(["bash", str(SCRIPT), str(_multi30k(tmp_path)), "2"], env=_script_env(tmp_path, wheels),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"pip install -q --no-index --find-links {wheels} " in proc.stdout and f"-r {wheels}/requirements.txt" in proc.stdout
    run = proc.stdout.split("would run: ")[1]
    assert "examples/translation/run.py" in run and "--stop_after_minutes 2 " in run and "--model_preset small" in run
    assert not (tmp_path / "out" / "run").exists()                  # nothing installed, nothing trained
