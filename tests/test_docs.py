"""README.md's table of supported architectures is the one docs/gen_architectures.py generates from the registry."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_architectures", ROOT / "docs" / "gen_architectures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_architecture_table_is_generated_from_the_registry():
    gen = _generator()
    readme = (ROOT / "README.md").read_text()
    assert readme.count(gen.BEGIN) == 1 and readme.count(gen.END) == 1
    block = readme[readme.index(gen.BEGIN): readme.index(gen.END) + len(gen.END)]
    assert block == gen.readme_block(), "README.md is stale: paste the output of `python docs/gen_architectures.py`"


def test_the_table_lists_every_builtin_model_type():
    import hf_emergence

    table = _generator().architecture_table()
    for model_type in hf_emergence.list_architectures():
        if hf_emergence.get_architecture(model_type).__module__.startswith("hf_emergence."):
            assert f"`{model_type}`" in table
