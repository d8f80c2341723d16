"""The README stays a short front door, docs/ links resolve, and benchmark results stay data.

Stdlib + pytest only (no Ray): these checks run in well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
RESULTS = REPO / "benchmarks" / "results"
RENDER = REPO / "benchmarks" / "render_results.py"
MAX_README_LINES = 200

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a ``# comment`` in a bash block is no heading)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(title: str) -> str:
    """GitHub's anchor for a heading: its rendered text, lower-cased, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"`([^`]*)`", r"\1", title)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"\*+|~~", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a markdown text, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in prose_lines(text):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def links(text: str) -> list[str]:
    """Relative link targets of a markdown text (code blocks and code spans are not links)."""
    found: list[str] = []
    for line in prose_lines(text):
        for target in LINK.findall(CODE_SPAN.sub("code", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                found.append(target)
    return found


def broken_links(path: Path, text: str | None = None) -> list[str]:
    """What is wrong with the relative links of ``path``: missing files or missing heading anchors."""
    text = path.read_text() if text is None else text
    problems = []
    for target in links(text):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{path.name}: {target} -> no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            problems.append(f"{path.name}: {target} -> no heading #{anchor} in {dest.name}")
    return problems


def load_renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_results", RENDER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["render_results"] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# ---- README: a front door, not a lab notebook


def test_readme_is_at_most_200_lines() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move depth to docs/"


def test_readme_has_no_lab_notes() -> None:
    text = README.read_text()
    markers = re.findall(r"\bissue \d+\b", text, re.IGNORECASE)
    assert not markers, f"issue markers in README.md: {markers}"
    assert "<!--" not in text, "HTML comment markers in README.md"
    json_lines = [line[:60] for line in text.splitlines() if line.startswith('{"')]
    assert not json_lines, f"raw JSON result lines in README.md (they belong in benchmarks/results/): {json_lines}"


def test_user_docs_name_no_development_folder() -> None:
    """Users clone the repository only: no page may send them to the team's folders beside it."""
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        hits = [ln.strip()[:80] for ln in page.read_text().splitlines() if "shared/" in ln or "../shared" in ln]
        assert not hits, f"{page.name} names a folder outside the repository: {hits}"


def test_readme_links_every_docs_page() -> None:
    targets = {t.partition("#")[0] for t in links(README.read_text())}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if f"docs/{p.name}" not in targets]
    assert not missing, f"docs pages the README does not link: {missing}"


# ---- links and anchors


def test_relative_links_and_anchors_resolve() -> None:
    files = markdown_files()
    assert len(files) > 1, "no docs/*.md pages found"
    total = sum(len(links(p.read_text())) for p in files)
    assert total > 0, "no relative links found: the link checker is not looking at anything"
    problems = [problem for p in files for problem in broken_links(p)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_link_checker_catches_broken_links() -> None:
    assert slug("Tiled, fused CNN training (`method.name: tiled`)") == "tiled-fused-cnn-training-methodname-tiled"
    assert slug("1. Start the cluster") == "1-start-the-cluster"
    assert slug("hetero_cifar10") == "hetero_cifar10"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}
    text = "[ok](README.md) [gone](no-such-page.md) [bad](#nowhere) [web](https://example.com) `[code](x.md)`\n# Here\n"
    problems = broken_links(DOCS / "page.md", text)
    assert len(problems) == 2 and "no-such-page.md" in problems[0] and "#nowhere" in problems[1], problems


# ---- benchmark results as data


def test_results_lines_are_json_with_provenance() -> None:
    files = sorted(RESULTS.glob("*.jsonl"))
    assert files, "no benchmarks/results/*.jsonl"
    problems = []
    for path in files:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            problems.append(f"{path.name}: empty")
        for i, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{path.name}:{i}: not JSON ({err})")
                continue
            missing = [k for k in ("benchmark", "date", "machine", "command") if not row.get(k)]
            if missing:
                problems.append(f"{path.name}:{i}: missing {missing}")
                continue
            if row["benchmark"] != path.stem:
                problems.append(f"{path.name}:{i}: benchmark {row['benchmark']!r} in the wrong file")
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["date"]):
                problems.append(f"{path.name}:{i}: date {row['date']!r} is not YYYY-MM-DD")
    assert not problems, "\n".join(problems)


def test_benchmark_tables_are_rendered() -> None:
    proc = subprocess.run([sys.executable, str(RENDER), "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_render_check_detects_a_stale_table() -> None:
    render = load_renderer()
    results = {p.stem: render.load(p) for p in sorted(RESULTS.glob("*.jsonl"))}
    doc = (DOCS / "benchmarks.md").read_text()
    assert render.render(doc, results) == doc
    name = next(iter(results))
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    stale = doc[: doc.index(start) + len(start)] + "\n" + doc[doc.index(end):]
    assert render.render(stale, results) != stale
