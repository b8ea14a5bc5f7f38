"""The documentation's links and tables stay true: README.md and docs/*.md.

* Every relative link or image (``[text](path)``, ``[text](path#anchor)``, ``[text](#anchor)``) points at an
  existing file, and every ``#anchor`` at a heading of the target file (GitHub's heading ids).
* README's schemes table has exactly one row per registered residual scheme, and every command-line flag the
  plugin adds to fairseq's models is named in README.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def prose_lines(path: Path) -> Iterator[Tuple[int, str]]:
    """(line number, text) of every line outside fenced code blocks."""
    fence = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.lstrip()
        marker = stripped[:3]
        if marker in ("```", "~~~"):
            if fence is None:
                fence = marker
            elif marker == fence:
                fence = None
            continue
        if fence is None:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's id for a heading: rendered text, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> Set[str]:
    """Every heading id of a markdown file, repeated headings numbered as GitHub does (-1, -2, ...)."""
    seen: Dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> List[Tuple[int, str]]:
    """(line number, target) of every relative link or image of a markdown file, code spans left out."""
    links = []
    for number, line in prose_lines(path):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if not EXTERNAL.match(target):
                links.append((number, target))
    return links


def test_slug_follows_github():
    assert slug("Two commands") == "two-commands"
    assert slug("Measured: the demo's DeepNorm model served three ways") == (
        "measured-the-demos-deepnorm-model-served-three-ways")
    assert slug("`deepnet_roberta`: encoder-only DeepNorm (BERT/RoBERTa-style pre-training)") == (
        "deepnet_roberta-encoder-only-deepnorm-bertroberta-style-pre-training")
    assert slug("Checkpoints on PyTorch >= 2.6") == "checkpoints-on-pytorch--26"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_relative_links_resolve(doc: Path):
    broken = []
    for number, target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{doc.relative_to(ROOT)}:{number}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{doc.relative_to(ROOT)}:{number}: {target} (no heading #{anchor} in {dest.name})")
    assert not broken, "\n".join(broken)


def test_link_checker_finds_broken_links(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## A section\n")
    doc = tmp_path / "README.md"
    doc.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#a-section) ![x](docs/a.md) [web](https://example.com/x.md)\n"
        "`[code](missing.md)`\n```\n[fenced](missing.md)\n```\n"
        "[bad](docs/missing.md) [bad anchor](docs/a.md#nowhere) [self](#title)\n# Title\n"
    )
    assert relative_links(doc) == [(1, "docs/a.md"), (1, "docs/a.md#a-section"), (1, "docs/a.md"),
                                   (6, "docs/missing.md"), (6, "docs/a.md#nowhere"), (6, "#title")]
    assert anchors(tmp_path / "docs" / "a.md") == {"title", "a-section"}


def readme_section(title: str) -> List[str]:
    """README's lines from the ``## title`` heading to the next ``## `` heading."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index(f"## {title}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start + 1:end]


def test_readme_schemes_table_has_one_row_per_registered_scheme():
    from deepnet_fairseq.schemes import SCHEME_NAMES

    rows = [re.match(r"\| `([a-z-]+)` \|", line) for line in readme_section("Residual schemes")]
    documented = [row.group(1) for row in rows if row]
    assert sorted(documented) == sorted(SCHEME_NAMES)
    assert len(documented) == len(set(documented))


@pytest.mark.parametrize("arch,stock", [("deepnet_transformer", "transformer"), ("deepnet_lm", "transformer_lm"),
                                        ("deepnet_roberta", "roberta")])
def test_readme_names_every_plugin_flag(arch: str, stock: str):
    from fairseq.models import ARCH_MODEL_REGISTRY

    import deepnet_fairseq.models  # noqa: F401  (registers the models with fairseq)

    def flags(name: str) -> Set[str]:
        parser = argparse.ArgumentParser(allow_abbrev=False)
        ARCH_MODEL_REGISTRY[name].add_args(parser)
        return {flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")}

    plugin_flags = flags(arch) - flags(stock)
    assert "--residual-scheme" in plugin_flags
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = sorted(flag for flag in plugin_flags if not re.search(rf"`{re.escape(flag)}(?![\w-])", readme))
    assert not missing, f"README names none of {missing}"


def test_demo_knobs_table_gives_the_script_defaults():
    """docs/demo.md's knobs table names every ``DEMO_*`` variable scripts/demo.sh reads, with its default."""
    script = (ROOT / "scripts" / "demo.sh").read_text(encoding="utf-8")
    defaults = dict(re.findall(r"^(DEMO_\w+)=\$\{\1:-([^}]*)\}", script, flags=re.M))
    assert "DEMO_UPDATES" in defaults and "DEMO_LR" in defaults
    documented: Dict[str, str] = {}
    for _, line in prose_lines(ROOT / "docs" / "demo.md"):
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        names = re.findall(r"`(DEMO_\w+)`", cells[0]) if len(cells) == 3 else []
        values = [re.sub(r"\s*\(.*\)$", "", value).strip("`") for value in cells[1].split(", ")] if names else []
        for index, name in enumerate(names):
            documented[name] = values[index] if len(values) == len(names) else ""
    assert sorted(set(defaults) - set(documented)) == []
    wrong = {name: (documented[name], value) for name, value in defaults.items()
             if documented[name] and documented[name] != value}
    assert not wrong, f"docs/demo.md default vs scripts/demo.sh: {wrong}"
