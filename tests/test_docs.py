"""What users read: the README is short and self-contained, every relative link resolves, no text points at
files users do not have (notes outside the repository, a machine's paths), the README's commands and names are
the package's."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: references to material that only exists outside the repository
FORBIDDEN = re.compile(r"methods\.md|anchors-gpu|openood-interface|shared/docs|/work/|\bseed 00\d\b|\bseed \d{3}_[0-9a-f]")
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "benchmarks").rglob("*.md"))]


def _user_facing_files():
    for pattern in ("*.md", "*.py", "*.yml", "*.cfg", "*.toml"):
        for path in REPO.rglob(pattern):
            rel = path.relative_to(REPO).as_posix()
            if rel.startswith((".", "build/", "benchmarks/_work/")) or "egg-info" in rel \
                    or rel == "tests/test_docs.py":
                continue
            yield rel, path


def test_nothing_points_outside_the_repository():
    hits = [f"{rel}:{n}: {line.strip()[:100]}" for rel, path in _user_facing_files()
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if FORBIDDEN.search(line)]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(doc):
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        assert resolved.exists(), f"{doc.name}: link to missing {target}"
        if anchor and resolved.suffix == ".md":
            slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                     for h in re.findall(r"^#+ (.+)$", resolved.read_text(), flags=re.M)}
            assert anchor in slugs, f"{doc.name}: no heading #{anchor} in {path or doc.name}"


def test_readme_is_short_and_names_what_exists():
    from openood_diffguard.cli import COMMANDS
    from openood_diffguard.openood.registration import packaged_configs

    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 170
    for stem in re.findall(r"^\| `(\w+)`", text, flags=re.M):  # the presets table
        assert stem in packaged_configs(), stem
    for name in re.findall(r"openood-diffguard ([a-z][a-z-]+)", text):
        assert name in COMMANDS or name in ("demo_out",), name
    assert "PLACEHOLDER" not in text
    from openood_diffguard.metrics import METRIC_COLUMNS

    assert "| method | " + " | ".join(METRIC_COLUMNS) + " |" in text  # the demo table: the package's column names
