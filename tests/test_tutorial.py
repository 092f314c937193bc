"""The tutorial chapters cannot drift from the code: their code blocks run, and every symbol they cite
exists.

Each chapter's ```python blocks run in order in one namespace (the asserts inside them are the
chapter's claims); every `Name` or `Name.attr` in backticks that names something in tinyavl must
resolve to it, every lower-case `name` or `name(...)` must be a name of the code, and every `module.name`
of one of tinyavl's modules (`hires.BLOCKS`, `tinyavl.load_pretrained`) must be in that module.
"""
import ast
import functools
import importlib
import pkgutil
import re
import sys
from pathlib import Path

import pytest

import kernels
import tinyavl.anyres
import tinyavl.attention_map
import tinyavl.attention_stats
import tinyavl.bench
import tinyavl.cache
import tinyavl.generate
import tinyavl.hires
import tinyavl.loading
import tinyavl.model
import tinyavl.params
import tinyavl.processing
import tinyavl.toy.attention_study
import tinyavl.toy.evaluate
import tinyavl.toy.evaluate_hires
import tinyavl.toy.intervals
import tinyavl.toy.scenes
import tinyavl.toy.train
import tinyavl.toy.train_hires
from kernels import sparse_attention  # imports without Triton too (TRITON_AVAILABLE is then False)

ROOT = Path(__file__).parent.parent
CHAPTERS = sorted((ROOT / "tutorial").glob("*.md"))
# sys.modules: the package's `generate` is the function (tinyavl/__init__.py), which hides the module of that name.
MODULES = [tinyavl.model, tinyavl.loading, tinyavl.anyres, tinyavl.cache, tinyavl.params,
           sys.modules["tinyavl.generate"], tinyavl.hires, tinyavl.processing, tinyavl.attention_map,
           tinyavl.attention_stats, tinyavl.bench,
           tinyavl.toy.scenes, tinyavl.toy.train, tinyavl.toy.evaluate, tinyavl.toy.intervals,
           tinyavl.toy.attention_study, tinyavl.toy.train_hires, tinyavl.toy.evaluate_hires, sparse_attention]


def code_blocks(chapter: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", chapter.read_text(), flags=re.S)


def test_there_are_chapters():
    assert CHAPTERS, "tutorial/ has no chapters"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_chapter_code_blocks_run(chapter, monkeypatch):
    """From the repository root, where a reader runs them (they load "weights/toy"), wherever pytest started."""
    monkeypatch.chdir(ROOT)
    blocks = code_blocks(chapter)
    assert blocks, f"{chapter.name} has no python code block"
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{chapter.name}[block {i}]", "exec"), namespace)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_chapter_cites_existing_symbols(chapter):
    cited = set(re.findall(r"`([A-Z]\w*(?:\.\w+)?|[a-z_]\w*)`", chapter.read_text()))
    checked = 0
    for symbol in cited:
        head, _, attr = symbol.partition(".")
        owners = [m for m in MODULES if hasattr(m, head)]
        if not owners:
            # Lower-case words in backticks are often parameters or config fields, not module symbols: here
            # only CamelCase names and dotted names must be tinyavl's (lower-case ones: the test below).
            assert not (head[0].isupper() or attr), f"{chapter.name} cites `{symbol}`, which tinyavl does not define"
            continue
        if attr:
            assert hasattr(getattr(owners[0], head), attr), f"{chapter.name} cites `{symbol}`: no such attribute"
        checked += 1
    assert checked >= 5, f"{chapter.name} cites too few code symbols ({checked})"


# Lower-case names the chapters cite from outside tinyavl: a library, and other libraries' functions.
EXTERNAL_NAMES = {"tokenizers", "flex_attention", "embedding_bag"}


def identifiers(source: str) -> set[str]:
    """Every name a Python source uses or defines: variables, attributes, arguments, keywords, and strings
    that are one name (a dict key, a policy's parameter)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, (ast.Attribute, ast.arg, ast.keyword, ast.FunctionDef, ast.ClassDef)):
            found.add(getattr(node, "attr", None) or getattr(node, "arg", None) or getattr(node, "name", None))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"[a-z_]\w*", node.value):
            found.add(node.value)
    return found


@functools.cache
def project_identifiers() -> frozenset:
    files = [*(ROOT / "tinyavl").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"), ROOT / "main.py"]
    return frozenset(set().union(*(identifiers(path.read_text()) for path in files)))


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_every_lower_case_name_a_chapter_cites_is_in_the_code(chapter):
    """A `name` or a call `name(...)` in backticks is a function, argument, field or key of the code (or of the
    chapter's own code blocks), or one of EXTERNAL_NAMES: a renamed function leaves no chapter citing its old
    name."""
    text = chapter.read_text()
    own = set().union(*(identifiers(block) for block in code_blocks(chapter)))
    cited = set(re.findall(r"`([a-z_]\w*)[`(]", text))
    assert sorted(cited - project_identifiers() - own - EXTERNAL_NAMES) == []


# Every module of tinyavl and kernels by the short name a chapter cites it by (`hires.BLOCKS`, `toy.train`),
# and the packages themselves.
MODULE_NAMES = {"tinyavl": "tinyavl", "kernels": "kernels"} | {
    module.name.rpartition(".")[2]: module.name
    for package in (tinyavl, kernels) for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")}
# What ends a file's name, not a module's attribute: `model.safetensors`, `config.json`, `evaluate.py`.
FILE_SUFFIXES = {"py", "json", "safetensors", "md", "png", "jpg", "txt", "jinja", "bin", "pt"}


def resolve(dotted: str):
    """What a dotted name of tinyavl or kernels names: its longest prefix that imports as a module, then
    attributes of it (AttributeError where one is missing)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            found = getattr(found, attr)
        return found
    raise ModuleNotFoundError(dotted)


def assigned_names(source: str) -> set[str]:
    """The names a Python source binds as variables (assigned, looped over, arguments), not those it imports."""
    nodes = list(ast.walk(ast.parse(source)))
    return {node.id for node in nodes if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)} | \
        {node.arg for node in nodes if isinstance(node, ast.arg)}


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_every_module_qualified_name_a_chapter_cites_resolves(chapter):
    """`hires.BLOCKS`, `anyres.map_token`, `tinyavl.toy.train.tune(...)`: a lower-case dotted name whose head
    is one of tinyavl's modules (by its short name) or a package names something there, unless it is a file's
    name (`model.safetensors`) or the chapter's code blocks assign the head as a variable of their own
    (`model.state_dict()` names a model's). A method is cited by its class (`KVCache.attend`)."""
    text = chapter.read_text()
    variables = set().union(*(assigned_names(block) for block in code_blocks(chapter)))
    cited = set(re.findall(r"`([a-z_]\w*(?:\.\w+)+)", text))
    for dotted in sorted(cited):
        head, last = dotted.partition(".")[0], dotted.rpartition(".")[2]
        if head not in MODULE_NAMES or head in variables or last in FILE_SUFFIXES:
            continue
        full = MODULE_NAMES[head] + dotted[len(head):]
        try:
            resolve(full)
        except (AttributeError, ModuleNotFoundError):
            pytest.fail(f"{chapter.name} cites `{dotted}`, which is not in {MODULE_NAMES[head]} (a method: cite it "
                        "by its class, `KVCache.attend`)")


def test_nothing_cites_files_a_reader_does_not_have():
    """Code, tests and docs cite papers and transformers' source: a clone of tinyavl has no shared spec folder beside it."""
    texts = [p for folder in ("tinyavl", "kernels", "tests", "tutorial", "weights") for p in (ROOT / folder).rglob("*")
             if p.suffix in (".py", ".md")] + [ROOT / "README.md", ROOT / "main.py"]
    marker = "../" + "shared"   # split, so this file does not cite it either
    assert [str(p.relative_to(ROOT)) for p in texts if marker in p.read_text(encoding="utf-8")] == []


DOCUMENTS = [ROOT / name for name in ("README.md", "kernels/README.md", "weights/README.md")]


def heading_anchors(document: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation but - and _ dropped,
    spaces as -, a repeated one suffixed -1, -2, ... Lines inside ``` fences are code, not headings."""
    anchors, seen, fenced = set(), {}, False
    for line in document.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = re.match(r"#{1,6} (.*)", line)
        if fenced or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_heading_anchors_as_github_makes_them():
    assert {"1-choosing-a-canvas", "what-it-means-for-the-kv-cache"} <= heading_anchors(ROOT / "tutorial" / "06-anyres.md")
    readme = heading_anchors(DOCUMENTS[0])
    assert "the-toy-llava-training-and-accuracy-under-every-policy" in readme
    assert "kv-policies-at-llava-15-7b-layer-shapes-against-the-memory-floor-python--m-tinyavlbench" in readme


@pytest.mark.parametrize("document", CHAPTERS + DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_between_documents_resolves(document):
    """A relative link names a file of the repository and, after #, one of its headings: moving a section
    leaves no link pointing where it was."""
    text = re.sub(r"```.*?```|`[^`]*`", "", document.read_text(), flags=re.S)  # code is not a link
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (document.parent / path) if path else document
        if not linked.exists() or (anchor and anchor not in heading_anchors(linked)):
            broken.append(target)
    assert broken == []
