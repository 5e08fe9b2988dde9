"""The pages a user reads match the repository: the README stays a front page, every link and result file it or
the docs name exists, and every option their `polarprune` commands use is one the command accepts."""
import re
from pathlib import Path

import pytest

from polarprune_cuda import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
         ROOT / "examples" / "README.md"]
PAGES = [p for p in PAGES if p.is_file()]
README_LINES = 250          # the front page: read in five minutes
FIRST_EXAMPLE_BY = 60       # the line by which a user sees a runnable command on their own model


def _fenced(text: str) -> list[tuple[int, str]]:
    """(first line number, body) of every fenced code block."""
    blocks, start, lines = [], None, text.splitlines()
    for i, line in enumerate(lines, 1):
        if line.startswith("```"):
            if start is None:
                start = i
            else:
                blocks.append((start, "\n".join(lines[start:i - 1])))
                start = None
    return blocks


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_the_readme_is_a_front_page_with_a_command_on_your_own_model_early():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_LINES
    own = [line for line, body in _fenced(text) if "polarprune prune" in body and "--init" in body
           and "--model" in body]
    assert own and own[0] <= FIRST_EXAMPLE_BY, own
    assert "make demo" in text and "make test" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    text = page.read_text()
    headings = {_slug(m) for m in re.findall(r"^#+ (.*)$", text, flags=re.M)}
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        if not path:
            if anchor not in headings:
                bad.append(target)
            continue
        if not (page.parent / path).exists():
            bad.append(target)
    assert not bad, f"{page.name}: {bad}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_result_file_exists(page):
    """`benchmarks/results/NAME.md` (or .json, .png) named in a page is in the repository (patterns such as
    `<device>-<date>` or `*` are not names)."""
    text = page.read_text()
    missing = []
    for name in set(re.findall(r"benchmarks/results/([\w.\-]+\.(?:md|json|png))", text)):
        if not (ROOT / "benchmarks" / "results" / name).is_file():
            missing.append(name)
    assert not missing, f"{page.name}: {sorted(missing)}"


def _prune_options() -> set[str]:
    parser = cli._parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    out = set()
    for name in ("prune", "export"):
        out |= {opt for action in sub.choices[name]._actions for opt in action.option_strings}
    return out


def test_every_option_of_a_documented_polarprune_command_exists():
    known = _prune_options()
    unknown, seen = [], 0
    for page in PAGES:
        for _, body in _fenced(page.read_text()):
            for command in re.split(r"(?<!\\)\n", body):
                words = command.replace("\\\n", " ").split("#")[0].split()
                for i, word in enumerate(words[:-1]):
                    if word in ("polarprune", "polarprune_cuda") and words[i + 1] in ("prune", "export"):
                        seen += 1
                        unknown += [f"{page.name}: {w}" for w in words[i + 2:]
                                    if w.startswith("--") and w.split("=")[0] not in known]
                        break
    assert seen >= 10 and not unknown, (seen, unknown)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_placeholder_is_left(page):
    """A line that is only an upper-case token (``RESULTS_TABLE``) is a placeholder a writer forgot."""
    left = [line for line in page.read_text().splitlines() if re.fullmatch(r"[A-Z][A-Z0-9_]{5,}", line.strip())]
    assert not left, left


def test_every_named_test_file_exists():
    """A test file (``tests/<folder>/test_<name>.py``) that a page, a comment of csrc/ or kernels/, the package, a
    benchmark script or a test names is in the repository (the committed results are records of their day, not read
    here)."""
    code = [p for folder in ("polarprune_cuda", "kernels", "benchmarks", "examples", "tests")
            for p in sorted((ROOT / folder).rglob("*")) if p.suffix in (".py", ".sh") and "results" not in p.parts]
    sources = [*PAGES, *sorted((ROOT / "csrc").iterdir()), *code]
    missing = []
    for path in sources:
        text = path.read_text()
        for name in set(re.findall(r"\btests/[\w/]*test_\w+\.py", text)):
            if not (ROOT / name).is_file():
                missing.append(f"{path.relative_to(ROOT)}: {name}")
        if "tests" in path.relative_to(ROOT).parts:
            continue   # the tests make files of their own (test_ok.py in a temporary folder): full paths only
        for name in set(re.findall(r"\b(test_\w+\.py)\b", text)):   # a bare name: a file somewhere under tests/
            if not any((ROOT / "tests").rglob(name)):
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, missing
