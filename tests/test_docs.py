"""The documentation pages and the files they name agree with the code: commands and flags parse, config keys are
fields of the config, named files and tests exist, links between the pages resolve, configs load and fit their
intended layouts (tests/test_examples.py). Cheap (no process groups, no data)."""
from __future__ import annotations

import argparse
import fnmatch
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from megapack.cli import build_parser
from megapack.training.preflight.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
# every page checked here; README.md links to each of the others
PAGES = ("README.md", "ARCHITECTURE.md", "tests/README.md", "tools/README.md", "configs/paper/README.md",
         "examples/README.md", "megapack/data/README.md", "megapack/training/README.md", "megapack/training/CONFIG.md",
         "megapack/evaluation/README.md", "megapack/MINIATURE.md")
README_MAX_LINES = 350  # the README is what a user needs to start; evidence and details live on the other pages
# Paths and names the pages use that a branch not yet merged creates (notes/plan.md's layout and vocabulary). The
# lead empties these after merging: a pending path or name that exists fails test_pending_is_still_pending.
PENDING_PATHS: set[str] = set()
PENDING_NAMES: set[str] = set()
TEXT = {page: (ROOT / page).read_text(encoding="utf-8") if (ROOT / page).is_file() else "" for page in PAGES}
README = TEXT["README.md"]
# flags of other tools that the pages name in prose
FOREIGN_FLAGS = {"--load", "--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time",  # Slurm's
                 "--signal", "--open-mode", "--array", "--dependency", "--export", "--kill-on-bad-exit", "--output"}
# the repository's own top-level folders: a word starting with one of them is a path in this checkout
PATH_RE = re.compile(r"(?<![\w/.-])((?:examples|configs|tools|tests|megapack)/[\w.*/-]*[\w*/])")
LINK_RE = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text without fenced code blocks (whose `#` lines are comments, not headings)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Option strings of a parser and of all its nested subparsers."""
    found = {s for a in parser._actions for s in a.option_strings}
    for sub in _subparsers(parser).values():
        found |= _options(sub)
    return found


def _tool_command(script: str) -> str:
    """The megapack subcommand a tools/*.py wrapper runs (`main(["preprocess", ...])`)."""
    text = (ROOT / script).read_text()
    match = re.search(r'main\(\["(\w+)"', text)
    assert match, f"{script}: expected a wrapper around megapack.cli.main"
    return match.group(1)


def _bash_commands(text: str) -> list[list[str]]:
    """Each command of a page's ```bash blocks as argv (continuations joined, comments, `&&` and VAR= dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            for part in filter(None, (p.strip() for p in line.split("&&"))):
                argv = shlex.split(part)
                while argv and re.fullmatch(r"[A-Z_0-9]+=\S*", argv[0]):
                    argv.pop(0)
                if argv:
                    commands.append(argv)
    return commands


def _own_script(argv: list[str]) -> str | None:
    """The tools/ script a `bash tools/x.sh ...` or `python tools/x.py ...` command runs, unless it wraps megapack."""
    if len(argv) < 2 or argv[0] not in ("bash", "python") or not argv[1].startswith("tools/"):
        return None
    path = ROOT / argv[1]
    return argv[1] if path.is_file() and not re.search(r'main\(\["\w+"', path.read_text()) else None


def _check_script_flags(argv: list[str], script: str, page: str) -> None:
    """Every --flag given to one of our scripts appears in its source (argparse option or shell test)."""
    text = (ROOT / script).read_text()
    for word in argv:
        for flag in re.findall(r"^--[a-z][a-z0-9-]*", word):
            assert flag in text, f"{page} `{' '.join(argv)}`: {script} has no {flag}"


def _megapack_argv(argv: list[str]) -> list[str] | None:
    if argv[0] == "megapack":
        return argv[1:]
    if argv[0] == "python" and len(argv) > 1 and argv[1].startswith("tools/") and "bench" not in argv[1]:
        return [_tool_command(argv[1]), *argv[2:]]
    return None


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _prose(text), re.M):
        slug, n = _slug(heading), 0
        while (slug if not n else f"{slug}-{n}") in found:
            n += 1
        found.add(slug if not n else f"{slug}-{n}")
    return found


def _is_pending(path: str) -> bool:
    return path.rstrip("/") in PENDING_PATHS


COMMANDS = [(page, argv) for page in PAGES for argv in _bash_commands(TEXT[page])]


@pytest.mark.parametrize("page", PAGES)
def test_page_exists(page):
    assert TEXT[page].strip(), f"{page} is missing or empty"


def test_readme_is_short():
    lines = len(README.splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; keep it under {README_MAX_LINES}: move details " \
                                     f"next to what they describe and link them"


def test_readme_links_every_page():
    targets = {(ROOT / t.split("#")[0]).resolve() for t in LINK_RE.findall(README)}
    for page in PAGES[1:]:
        assert (ROOT / page).resolve() in targets, f"README.md does not link {page}"


def test_readme_has_commands():
    commands = _bash_commands(README)
    assert any(_megapack_argv(c) for c in commands) and any(c[0] in ("bash", "sbatch") for c in commands)
    assert ["bash", "examples/quickstart.sh"] in commands and ["bash", "tests/run.sh"] in commands


@pytest.mark.parametrize("page,argv", COMMANDS, ids=lambda x: " ".join(x)[:60] if isinstance(x, list) else x)
def test_command_parses(page, argv):
    """megapack / tools commands parse with the real parser; train overrides are real keys; scripts exist."""
    mp = _megapack_argv(argv)
    if mp is not None:
        try:
            args = build_parser().parse_args(mp)
        except SystemExit as exc:
            pytest.fail(f"{page}: {' '.join(argv)}: argparse refused it (exit {exc.code})")
        if args.command == "train":
            for config in args.config:
                load_config(ROOT / config, args.overrides)
        return
    if argv[0] in ("bash", "sbatch"):
        script = next(a for a in argv[1:] if not a.startswith("-"))
        assert (ROOT / script).is_file(), f"{page}: {script}"
        if _own_script(argv):
            _check_script_flags(argv, script, page)
        rest = argv[argv.index(script) + 1:]
        if rest and rest[0].endswith(".yaml"):  # the launchers take CONFIG [key.sub=value ...]
            load_config(ROOT / rest[0], rest[1:])
        return
    if argv[0] == "python" and argv[1] != "-c":
        assert (ROOT / argv[1]).is_file(), f"{page}: {argv[1]}"
        if _own_script(argv):
            _check_script_flags(argv, argv[1], page)


@pytest.mark.parametrize("page", PAGES)
def test_inline_flags_exist(page):
    """Every `--flag` quoted inline exists in the subcommand named with it, else in some megapack parser."""
    text = TEXT[page]
    parser = build_parser()
    subs = _subparsers(parser)
    every = _options(parser)
    for span in re.findall(r"`([^`\n]*--[^`\n]*)`", text):
        words = span.split()
        if _own_script(words):  # `bash tools/gpu_check.sh OUT --budget-s 300`: flags of our own scripts
            _check_script_flags(words, words[1], page)
            continue
        scope = _options(subs[words[1]]) if words[0] == "megapack" and words[1] in subs else every
        for word in words:
            for flag in re.findall(r"--[a-z][a-z0-9-]*", word):
                assert flag in scope or flag in FOREIGN_FLAGS, f"{page} `{span}`: {flag} is not a megapack flag"
    for name in re.findall(r"`megapack (\w+)", text):
        assert name in subs, f"{page}: `megapack {name}` is not a subcommand"


@pytest.mark.parametrize("page", PAGES)
def test_paths_exist(page):
    """Every path in this checkout a page names (a file, a folder/, a glob) exists, or is pending a merge."""
    for path in sorted(set(PATH_RE.findall(TEXT[page]))):
        if _is_pending(path):
            continue
        if "*" in path:
            assert list(ROOT.glob(path)), f"{page} names {path}, which matches nothing"
        else:
            assert (ROOT / path).exists(), f"{page} names {path}, which does not exist"


def test_package_table_names_real_modules():
    """ARCHITECTURE.md's package table: the modules named in a package's row are files of that package."""
    rows = re.findall(r"^\| `(megapack/[\w./]*)`[^|]* \| (.*) \|$", TEXT["ARCHITECTURE.md"], re.M)
    assert len(rows) >= 10, "ARCHITECTURE.md: the package table is missing"
    for first, job in rows:
        folder = first if first.endswith("/") else first.rsplit("/", 1)[0] + "/"
        for name in re.findall(r"`(\w+\.py)`", job):
            path = folder + name
            assert _is_pending(path) or (ROOT / path).is_file(), f"ARCHITECTURE.md: {first} has no {name}"


@pytest.mark.parametrize("page", PAGES)
def test_named_tests_exist(page):
    """`test_x.py`, `test_x.py::test_name` (globs allowed), a following `::test_other`, and a bare `test_name`."""
    defined = {p.name: set(re.findall(r"^(?:async )?def (test_\w+)", p.read_text(), re.M))
               for p in (ROOT / "tests").glob("test_*.py")}
    every = set().union(*defined.values())
    last = None
    for span in re.findall(r"`([^`\n]+)`", TEXT[page]):
        for file, names in re.findall(r"(?:^|(?<=[\s/]))(test_\w+\.py)((?:::[\w*]+)*)", span):
            if _is_pending(f"tests/{file}"):
                continue
            assert file in defined, f"{page} names tests/{file}, which does not exist"
            last = file
            for name in filter(None, names.split("::")):
                assert fnmatch.filter(defined[file], name), f"{page}: tests/{file} has no {name}"
        if span.startswith("::"):
            assert last, f"{page}: `{span}` follows no test file"
            assert fnmatch.filter(defined[last], span[2:]), f"{page}: tests/{last} has no {span[2:]}"
        elif re.fullmatch(r"test_\w+", span):
            assert span in every, f"{page}: no test is called {span}"


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve(page):
    """Relative links (and their #anchors) point at files, folders and headings that exist."""
    folder = (ROOT / page).parent
    for target in LINK_RE.findall(_prose(TEXT[page])):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (folder / path).resolve() if path else (ROOT / page).resolve()
        assert dest.exists(), f"{page}: the link {target} points nowhere"
        assert ROOT in dest.parents or dest == ROOT, f"{page}: the link {target} leaves the repository"
        if anchor:
            assert dest.suffix == ".md", f"{page}: {target}: an anchor into a file that is not markdown"
            assert anchor in _anchors(dest.read_text(encoding="utf-8")), \
                f"{page}: {target}: {dest.relative_to(ROOT)} has no heading with anchor #{anchor}"


def test_data_page_lists_every_bad_record_reason():
    """Every reason a record is rejected for while reading is named in megapack/data/README.md's "Bad records" (the
    reasons of rendering: tests/test_hf_templates.py::test_readme_lists_every_render_reason)."""
    from megapack.data.sources.formats import REASONS

    page = TEXT["megapack/data/README.md"]
    section = page[page.index("## Bad records"):page.index("## Tokenizers")]
    for reason in REASONS:
        assert f"`{reason}`" in section, f"megapack/data/README.md: the bad-record reason `{reason}` is not listed"


def test_readme_section_table_covers_the_config():
    sections = set(RunConfig.model_fields)
    rows = {r[0] for r in re.findall(r"^\| `(\w+)` \| (.*) \|$", README, re.M)}
    assert rows >= sections, f"README: the section table misses {sorted(sections - rows)}"


@pytest.mark.parametrize("page", PAGES)
def test_config_keys_exist(page):
    """Keys in a section table and `section.key` mentions are fields of the pydantic config (`data.sources` and
    other names of megapack's own modules are module paths, not keys)."""
    text = TEXT[page]
    sections = {name: field.annotation for name, field in RunConfig.model_fields.items()}
    for section, keys in re.findall(r"^\| `(\w+)` \| (.*) \|$", text, re.M):
        if section not in sections:
            continue
        while re.search(r"\([^()]*\)", keys):
            keys = re.sub(r"\([^()]*\)", "", keys)  # parenthesised text holds values and remarks, not keys
        for key in re.findall(r"`([\w/]+)`", keys):
            names = [key] if "/" not in key else [key.split("/")[0], key.split("/")[0][:-1] + key.split("/")[1]]
            for name in names:
                assert name in sections[section].model_fields, f"{page} table: {section}.{name} is not a config key"
    for section, key in re.findall(r"`(\w+)\.(\w+)", text):
        module = ROOT / "megapack" / section / key
        if section in sections and not (module.is_dir() or module.with_suffix(".py").is_file()):
            assert key in sections[section].model_fields, f"{page}: `{section}.{key}` is not a config key"


def _code_words() -> set[str]:
    words: set[str] = set()
    for folder in ("megapack", "tests", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "test_docs.py":  # it names the pending ones
                continue
            words |= set(re.findall(r"\w+", path.read_text(encoding="utf-8")))
    return words


@pytest.mark.parametrize("page", ["ARCHITECTURE.md", "README.md"])
def test_named_code_exists(page):
    """The classes, functions, constants and fields ARCHITECTURE.md (all of it) and the README's glossary name in
    backticks exist in the code (as words of megapack/, tests/ or tools/), or are pending a merge."""
    text = TEXT[page]
    if page == "README.md":
        text = text.split("## Words mean one thing everywhere", 1)[1].split("\n## ", 1)[0]
    words = _code_words()
    for span in re.findall(r"`([^`\n]+)`", _prose(text)):
        if not re.fullmatch(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*", span) or re.search(
                r"\.(py|md|json|jsonl|yaml|png|sh)$", span):
            continue  # values, flags, commands, file names
        if not ("_" in span or re.search(r"[A-Z]", span)):
            continue  # a plain lower-case word: a config value or a name of a packing, backend, template
        for part in span.split("."):
            assert part in words or part in PENDING_NAMES, f"{page}: `{span}`: no {part} in the code"


def test_pending_is_still_pending():
    """PENDING_PATHS / PENDING_NAMES hold only what does not exist yet and what a page still names."""
    pages = "\n".join(TEXT.values())
    for path in sorted(PENDING_PATHS):
        assert not (ROOT / path).exists(), f"{path} exists now: remove it from PENDING_PATHS in tests/test_docs.py"
        assert path in pages or Path(path).name in pages, f"no page names {path}: remove it from PENDING_PATHS"
    words = _code_words()
    for name in sorted(PENDING_NAMES):
        assert name not in words, f"{name} is in the code now: remove it from PENDING_NAMES in tests/test_docs.py"
        assert re.search(rf"`[^`\n]*\b{name}\b[^`\n]*`", pages), f"no page names {name}: remove it from PENDING_NAMES"
