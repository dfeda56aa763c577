"""The documentation cannot rot silently: every relative link and anchor in README.md and docs/ resolves, and
every command block names modules, scripts and repository files that exist."""

from __future__ import annotations

import re
import shlex
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Modules run with `python -m` in the docs that are not this repository's: tools the extras install.
EXTERNAL_MODULES = {
    "pip", "venv", "pytest", "lmms_eval", "torch.distributed.run", "vllm.entrypoints.openai.api_server",
}
REPO_PACKAGES = ("llava", "playground", "benchmarks")
# Top-level folders whose paths, when a command names them, must exist (others are outputs: checkpoints/, logs/).
REPO_DIRS = ("scripts", "assets", "playground", "tests", "benchmarks", "llava", "docs", ".ci")
FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _prose_and_blocks(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The lines outside fenced blocks, and each fenced block as (language, body)."""
    prose, blocks, block, lang = [], [], None, ""
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            if block is None:
                block, lang = [], line.strip()[3:].strip()
            else:
                blocks.append((lang, "\n".join(block)))
                block = None
            continue
        (prose if block is None else block).append(line)
    assert block is None, "an unclosed code fence"
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    prose, _ = _prose_and_blocks(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        match = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return frozenset(found)


def _links(path: Path) -> list[str]:
    prose, _ = _prose_and_blocks(path.read_text(encoding="utf-8"))
    text = "\n".join(re.sub(r"`[^`]*`", "", line) for line in prose)  # no links inside inline code
    return LINK.findall(text)


def link_problems(path: Path) -> list[str]:
    problems = []
    for target in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{_page_id(path)}: link to a missing file: {target}")
            continue
        if anchor:
            if destination.suffix != ".md":
                problems.append(f"{_page_id(path)}: anchor into a file that is not Markdown: {target}")
            elif anchor not in anchors(destination):
                problems.append(f"{_page_id(path)}: no heading for anchor #{anchor} in {_page_id(destination)}")
    return problems


def _module_exists(name: str) -> bool:
    parts = name.split(".")
    base = ROOT.joinpath(*parts)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() or (base / "__main__.py").is_file()


def _commands(body: str) -> list[list[str]]:
    """Shell words of each command in a block (continuation lines joined, comments and heredoc bodies dropped)."""
    joined = re.sub(r"\\\n\s*", " ", body)
    commands, heredoc_end = [], None
    for line in joined.splitlines():
        if heredoc_end is not None:
            if line.strip() == heredoc_end:
                heredoc_end = None
            continue
        match = re.search(r"<<-?\s*'?(\w+)'?", line)
        if match:
            heredoc_end = match.group(1)
            line = line[: match.start()]
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            words = line.split()
        if words:
            commands.append(words)
    return commands


def command_problems(path: Path) -> list[str]:
    _, blocks = _prose_and_blocks(path.read_text(encoding="utf-8"))
    problems = []
    for lang, body in blocks:
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        for words in _commands(body):
            for i, word in enumerate(words):
                if word == "-m" and i + 1 < len(words) and i > 0 and "python" in words[i - 1]:
                    module = words[i + 1]
                    if module.split(".")[0] in REPO_PACKAGES:
                        if not _module_exists(module):
                            problems.append(f"{_page_id(path)}: `python -m {module}`: no such module in the repository")
                    elif module not in EXTERNAL_MODULES:
                        problems.append(f"{_page_id(path)}: `python -m {module}`: not a known module")
                output = i > 0 and re.match(r"--?\w*out", words[i - 1]) or re.match(r"\w*OUT\w*=", word)
                candidate = word.split("=", 1)[-1].rstrip(");,'\"")
                if not output and candidate.startswith(tuple(d + "/" for d in REPO_DIRS)) and not re.search(r"[*${}<>]", candidate):
                    if not (ROOT / candidate).exists():
                        problems.append(f"{_page_id(path)}: `{candidate}` does not exist in the repository")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_relative_link_and_anchor_resolves(page):
    assert link_problems(page) == []


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_command_names_modules_and_files_that_exist(page):
    assert command_problems(page) == []


def test_readme_links_to_every_docs_page_and_stays_short():
    readme = ROOT / "README.md"
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in _links(readme)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert missing == [], f"README.md does not link to {missing}"
    assert readme.stat().st_size <= 25 * 1024


def test_the_checks_catch_a_broken_link_a_missing_anchor_and_a_missing_module(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "__init__.py").write_text("")
    (tmp_path / "llava" / "real.py").write_text("")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# A page\n\n## Its `second` part, twice\n\n## Its `second` part, twice\n\n"
        "[ok](#its-second-part-twice-1) [ok](page.md#a-page) [bad](#nowhere) [gone](missing.md) "
        "`[not a link](nowhere.md)`\n\n"
        "```bash\npython -m llava.real --x 1 && python -m llava.unreal\nbash scripts/none.sh \\\n  --flag\n"
        "python -m sometool\npython -m llava.real --out benchmarks/new && OUT_DIR=scripts/new ls\n```\n"
    )
    assert link_problems(page) == [
        "docs/page.md: no heading for anchor #nowhere in docs/page.md",
        "docs/page.md: link to a missing file: missing.md",
    ]
    assert command_problems(page) == [
        "docs/page.md: `python -m llava.unreal`: no such module in the repository",
        "docs/page.md: `scripts/none.sh` does not exist in the repository",
        "docs/page.md: `python -m sometool`: not a known module",
    ]
