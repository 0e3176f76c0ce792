"""The documentation cannot rot: every Python snippet in the docs runs, every page is in the nav,
and every test the docs cite exists.

Each page's ```python blocks run in order in one namespace (later blocks may use names from
earlier ones), in a temporary working directory, on the CPU. A block whose fence carries
``notest`` (```python {.notest}) is not run: it is for commands that need a GPU, real data or
hours. A block marked ``xfail`` (```python {.xfail}) documents correct usage that currently fails
because of a known library bug: it runs, and the page is reported as an expected failure from
that block on; once the bug is fixed the block passes, the rest of the page runs, and a
warning asks for the mark to be removed. README.md's Python blocks, if any, are run the same way.
"""

from __future__ import annotations

import ast
import copy
import re
import sys
import textwrap
import types
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")
SKIP_MARK = "notest"
XFAIL_MARK = "xfail"


@dataclass
class Block:
    """One fenced code block of a Markdown file."""

    language: str
    options: list[str]
    code: str
    line: int  # 1-based line of the opening fence
    info: str = ""  # the fence's info string as written

    @property
    def runnable(self) -> bool:
        return self.language in ("python", "py") and SKIP_MARK not in self.options

    @property
    def xfail(self) -> bool:
        return XFAIL_MARK in self.options

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.code.splitlines() if line.strip()), "<empty>")


def fenced_blocks(text: str) -> list[Block]:
    """Returns the fenced code blocks of a Markdown text, indented ones (tabs, admonitions) included."""
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].strip()
        words = info.replace("{", " ").replace("}", " ").replace(".", " ").split()
        language, options = (words[0].lower(), words[1:]) if words else ("", [])
        body: list[str] = []
        end = index + 1
        while end < len(lines):
            closing = FENCE.match(lines[end])
            if closing and closing["fence"][0] == fence[0] and len(closing["fence"]) >= len(fence) and not closing["info"].strip():
                break
            body.append(lines[end])
            end += 1
        else:
            raise ValueError(f"unclosed code fence opened at line {index + 1}")
        code = textwrap.dedent("\n".join(line[len(indent):] if line.startswith(indent) else line for line in body))
        blocks.append(Block(language, options, code, index + 1, info))
        index = end + 1
    return blocks


def markdown_pages() -> list[Path]:
    return sorted(path for path in DOCS.rglob("*.md") if "_hooks" not in path.parts)


def pages_with_code() -> list[Path]:
    pages = markdown_pages()
    readme = REPO / "README.md"
    if readme.is_file():
        pages.append(readme)
    return [page for page in pages if any(block.runnable for block in fenced_blocks(page.read_text(encoding="utf-8")))]


def page_id(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# --------------------------------------------------------------------------- the snippets run


@pytest.fixture
def isolated_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Private copies of kdkit's loss and adapter registries and of timm's model registry, so that
    what a page registers (Extending kdkit registers a loss, an adapter and a model) is gone after it."""
    import timm.models._registry as timm_registry

    import kdkit

    for registry in (kdkit.LOSSES, kdkit.ADAPTERS):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    for name, value in list(vars(timm_registry).items()):
        if name.startswith("_") and isinstance(value, (dict, set)):
            monkeypatch.setattr(timm_registry, name, copy.deepcopy(value) if isinstance(value, defaultdict) else copy.copy(value))


@pytest.mark.parametrize("page", pages_with_code(), ids=page_id)
@pytest.mark.usefixtures("isolated_registries")
def test_page_snippets_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs the page's Python blocks in order in one namespace; a failure names the block."""
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "kdkit-cache"))
    # A real module, as a script would have: timm's register_model and dataclasses look the
    # defining module up in sys.modules.
    module = types.ModuleType("docs_" + re.sub(r"\W", "_", page_id(page).removesuffix(".md")))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    for block in fenced_blocks(page.read_text(encoding="utf-8")):
        if not block.runnable:
            continue
        where = f"{page_id(page)}:{block.line} ({block.first_line!r})"
        try:
            code = compile(block.code, where, "exec")
        except SyntaxError as error:
            pytest.fail(f"snippet at {where} does not compile: {error}")
        try:
            exec(code, namespace)  # noqa: S102 - running the docs is the point of this test
        except Exception as error:  # re-raised with the block that failed
            if block.xfail:
                pytest.xfail(f"known failure of the snippet at {where}: {type(error).__name__}: {error}")
            raise AssertionError(f"snippet at {where} failed: {type(error).__name__}: {error}") from error
        if block.xfail:
            warnings.warn(f"the snippet at {where} passes now: remove its `{XFAIL_MARK}` mark", stacklevel=1)


@pytest.mark.parametrize("page", markdown_pages(), ids=page_id)
def test_every_python_block_compiles(page: Path) -> None:
    """Skipped (notest) blocks still have to be valid Python."""
    for block in fenced_blocks(page.read_text(encoding="utf-8")):
        if block.language in ("python", "py"):
            try:
                ast.parse(block.code)
            except SyntaxError as error:
                pytest.fail(f"{page_id(page)}:{block.line} ({block.first_line!r}) is not valid Python: {error}")


# What pymdownx.superfences renders as a highlighted block: a language, then optionally an
# attribute list ({.notest}) or key="value" options. A bare word after the language
# (```python notest) turns the whole block into a paragraph of inline code.
RENDERABLE_INFO = re.compile(r'[\w+-]*(?:\s+\{[^}]*\})?(?:\s+[\w-]+="[^"]*")*')


@pytest.mark.parametrize("page", markdown_pages(), ids=page_id)
def test_fence_headers_render(page: Path) -> None:
    bad = [
        f"{page_id(page)}:{block.line}: ```{block.info}"
        for block in fenced_blocks(page.read_text(encoding="utf-8"))
        if not RENDERABLE_INFO.fullmatch(block.info)
    ]
    assert bad == [], "use ```python {.notest} rather than ```python notest"


def test_fence_parser() -> None:
    text = textwrap.dedent(
        """\
        ```python
        a = 1
        ```
        === "Tab"

            ```python {.notest}
            b = 2
            ```
        ```python {.xfail}
        c = 3
        ```
        ```bash
        ls
        ```
        """
    )
    blocks = fenced_blocks(text)
    assert [(b.language, b.runnable, b.xfail, b.code) for b in blocks] == [
        ("python", True, False, "a = 1"),
        ("python", False, False, "b = 2"),
        ("python", True, True, "c = 3"),
        ("bash", False, False, "ls"),
    ]


# --------------------------------------------------------------------------- the site's structure


def nav_pages(entries: object) -> list[str]:
    """Every page path in an mkdocs ``nav`` value (nested lists and dicts of titles to paths)."""
    if isinstance(entries, str):
        return [] if "://" in entries else [entries]
    if isinstance(entries, list):
        return [page for entry in entries for page in nav_pages(entry)]
    if isinstance(entries, dict):
        return [page for value in entries.values() for page in nav_pages(value)]
    return []


def load_mkdocs_config() -> dict:
    import yaml

    class Loader(yaml.SafeLoader):
        """Accepts mkdocs.yml's ``!!python/name:`` tags without importing anything."""

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    return yaml.load((REPO / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)


def test_every_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    listed = nav_pages(load_mkdocs_config()["nav"])
    on_disk = [path.relative_to(DOCS).as_posix() for path in markdown_pages()]
    assert sorted(set(on_disk) - set(listed)) == [], "pages missing from the nav in mkdocs.yml"
    assert sorted(set(listed) - set(on_disk)) == [], "nav entries without a page"
    assert len(listed) == len(set(listed)), "a page is listed twice in the nav"


def test_api_reference_covers_every_module() -> None:
    """Every public module of kdkit and kdkit_zoo (subpackages included, as the zoo's
    ``kdkit_zoo.hdkd.*``) has a ``::: module`` directive somewhere in docs/api."""
    documented = set()
    for page in (DOCS / "api").glob("*.md"):
        documented |= set(re.findall(r"^:::\s*([\w.]+)", page.read_text(encoding="utf-8"), flags=re.M))
    modules = {
        ".".join(path.relative_to(REPO).with_suffix("").parts)
        for package in ("kdkit", "kdkit_zoo")
        for path in (REPO / package).rglob("*.py")
        if not path.stem.startswith("_")
    }
    assert sorted(modules - documented) == []


CITED_TEST = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def test_cited_tests_exist() -> None:
    """Pages that name a test as proof (``tests/test_x.py::test_y``) name one that exists."""
    missing = []
    for page in markdown_pages():
        for file, name in CITED_TEST.findall(page.read_text(encoding="utf-8")):
            source = REPO / file
            defined = source.is_file() and re.search(rf"^\s*def {name}\(", source.read_text(encoding="utf-8"), flags=re.M)
            if not defined:
                missing.append(f"{page_id(page)}: {file}::{name}")
    assert missing == []


def test_relative_links_point_to_existing_pages() -> None:
    """A quick check of the links mkdocs --strict also validates, without building the site."""
    broken = []
    for page in markdown_pages():
        for target in re.findall(r"\]\(([^)\s]+?\.md)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).resolve().is_file():
                broken.append(f"{page_id(page)} -> {target}")
    assert broken == []


def test_hook_rewrites_docstring_roles() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("docstring_roles", DOCS / "_hooks" / "docstring_roles.py")
    assert spec is not None and spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    html = "<p>See :class:<code>LossTerm</code> and :func:<code>~kdkit.checkpoint.load_model</code>.</p><p>class:<code>~kdkit.StepOutput</code>; x</p>"
    assert hook.on_page_content(html) == (
        "<p>See <code>LossTerm</code> and <code>load_model</code>.</p><p><code>StepOutput</code>; x</p>"
    )
    assert hook.on_page_content("<p>a subclass:<code>x</code></p>") == "<p>a subclass:<code>x</code></p>"
    assert hook.on_page_content("<p>the terms::</p><p>e.g.::</p><p>x <code>f</code>::</p>") == (
        "<p>the terms:</p><p>e.g.:</p><p>x <code>f</code>:</p>"
    )
    assert hook.on_page_content("<p>see <code>a::b</code></p>") == "<p>see <code>a::b</code></p>"

