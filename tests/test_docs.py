"""README.md and docs/: links resolve, every `python -m` module runs, and every generated table
equals what `python -m benchmarks.readme` makes from the committed results."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest

from benchmarks import readme

ROOT = Path(__file__).resolve().parents[1]
DOCS = readme.documents(ROOT)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
MODULE = re.compile(r"python3? -m\s+([A-Za-z_][\w.]*)")
SETUP = (  # the README's two set-up commands, byte for byte (CI and users copy them)
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ."
    " && python -m benchmarks.leaderboard --preset quick",
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e "
    '".[test]" && python -m pytest -q',
)


def without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def prose(text: str) -> str:
    """`text` without code blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", without_code_blocks(text))


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    headings = re.findall(r"^#+ (.*)$", without_code_blocks(path.read_text()), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_points_at_a_file_and_heading():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(prose(doc.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path) if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def runnable(module: str) -> bool:
    """`python -m module` would run something: a module with a main guard, or a package with a
    __main__ (found without importing the module itself)."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return False
    if spec.submodule_search_locations is not None:
        return importlib.util.find_spec(f"{module}.__main__") is not None
    if spec.origin is None or not spec.origin.endswith(".py"):
        return True  # a built-in or compiled module
    return '__name__ == "__main__"' in Path(spec.origin).read_text()


def test_every_python_m_module_named_in_the_docs_runs():
    named = {m: doc for doc in DOCS for m in MODULE.findall(doc.read_text())}
    assert {"benchmarks.leaderboard", "benchmarks.readme", "pytest"} <= set(named)
    missing = [f"{named[m].relative_to(ROOT)}: python -m {m}" for m in sorted(named)
               if not runnable(m)]
    assert not missing, missing


def test_the_module_check_catches_a_library_module_and_a_typo():
    assert runnable("benchmarks.fork_cost") and runnable("benchmarks.meta_train")
    assert not runnable("benchmarks.leaderboard.stats")  # importable, but runs nothing
    assert not runnable("benchmarks.no_such_study")


def test_the_generated_blocks_equal_what_the_committed_results_make():
    assert readme.stale(ROOT) == [], "run: python -m benchmarks.readme"
    used = {m["name"] for doc in DOCS for m in readme.blocks(doc.read_text())}
    assert "standard-head" in {m["name"] for m in readme.blocks(DOCS[0].read_text())}
    assert used == set(readme.BLOCKS), f"blocks no page shows: {set(readme.BLOCKS) - used}"


def copy_of_the_docs(tmp_path: Path) -> Path:
    """README.md, docs/ and every block's sources under `tmp_path`."""
    for doc in DOCS:
        (tmp_path / doc.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(doc, tmp_path / doc.relative_to(ROOT))
    for block in readme.BLOCKS.values():
        for source in block.sources:
            (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / source, tmp_path / source)
    return tmp_path


def test_a_retyped_number_or_a_new_result_makes_a_block_stale(tmp_path):
    root = copy_of_the_docs(tmp_path)
    readme_md = root / "README.md"
    text = readme_md.read_text()
    head = next(m for m in readme.blocks(text) if m["name"] == "standard-head")
    number = re.search(r"\d\.\d{3}", head[0])
    retyped = head[0][: number.start()] + "0.999" + head[0][number.end():]
    readme_md.write_text(text.replace(head[0], retyped))
    assert readme.stale(root) == ["README.md: standard-head"]

    readme_md.write_text(text)  # the README as committed, then a study re-run
    learnability = root / "results/learnability.md"
    learnability.write_text(learnability.read_text().replace("| gsm8k |", "| gsm8k (rerun) |"))
    assert readme.stale(root) == ["docs/learnability.md: learnability"]
    assert readme.main(["--root", str(root)]) == 0  # the command rewrites it ...
    assert readme.stale(root) == []
    assert "gsm8k (rerun)" in (root / "docs/learnability.md").read_text()
    assert (root / "README.md").read_text() == text  # ... and leaves the rest alone


def test_a_block_without_its_end_or_with_an_unknown_name_is_refused():
    with pytest.raises(ValueError, match="'learnability' has no '<!-- END learnability -->'"):
        readme.fill("<!-- BEGIN learnability -->\ntext\n", ROOT, where="page.md")
    with pytest.raises(ValueError, match="unknown generated block 'nonsense'; known blocks"):
        readme.fill("<!-- BEGIN nonsense -->\n<!-- END nonsense -->\n", ROOT)


def test_the_readme_is_a_front_door():
    text = DOCS[0].read_text()
    assert len(text.splitlines()) <= 300
    for command in SETUP:
        assert f"```bash\n{command}\n```" in text
    linked = set(LINK.findall(prose(text)))
    unlinked = [p.name for p in DOCS[1:] if f"docs/{p.name}" not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
    assert "DESIGN.md" not in text and "FACTS" not in text  # files outside this repository
