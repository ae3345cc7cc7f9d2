"""README.md's table of supported architectures is the one docs/gen_architectures.py generates from the registry;
every link and image of the markdown pages exists."""

import importlib.util
import re
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


def _local_links(text: str) -> list[str]:
    """Targets of the markdown links and images in ``text`` that point into the repository (no URL, no anchor)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)            # code blocks are not links
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_every_link_and_image_in_the_docs_exists():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md")),
             *sorted((ROOT / "examples").rglob("*.md"))]
    broken = [f"{page.relative_to(ROOT)}: {target}" for page in pages if "runs" not in page.relative_to(ROOT).parts
              for target in _local_links(page.read_text()) if not (page.parent / target).exists()]
    assert broken == []
