"""The jinja side of `--template hf`: transformers' sandboxed environment (settings, filters, globals, the
`{% generation %}` tag that records the spans it renders) and where a checkpoint keeps its chat template
(`chat_template.jinja`, else `tokenizer_config.json`).

A template is code from a downloaded folder, so rendering one record has a budget (`RenderBudget`): a number of
steps (each function or macro call, attribute or item lookup, and each step of a `range`), a rendered length, and
no single operation (`*`, `**`, `%`, a width-taking filter) whose result would pass that length. Past the budget,
`TemplateBudgetExceeded` is raised and the record becomes a bad record; a normal template uses a few thousand steps.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import date, datetime
from pathlib import Path

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

from megapack.errors import MegapackError, nested_too_deeply

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# While HFChatTemplate.render tracks: {"pos": characters rendered so far, "spans": [(start, end), ...]}
GENERATION_SPANS: ContextVar = ContextVar("megapack_generation_spans", default=None)
MAX_RENDER_STEPS = 2_000_000
MAX_RENDER_CHARS = 64 * 2**20
_BIG_NUMBER = re.compile(r"\d{9,}")  # a width or precision of 10^8 or more in a format string


class TemplateBudgetExceeded(Exception):
    """A chat template went past its per-record budget of steps or rendered characters."""


class RenderBudget:
    """What one record's renderings may still spend: steps and characters."""

    def __init__(self, steps: int = MAX_RENDER_STEPS, chars: int = MAX_RENDER_CHARS) -> None:
        self.steps, self.chars = steps, chars

    def step(self) -> None:
        """Spend one step."""
        self.steps -= 1
        if self.steps < 0:
            raise TemplateBudgetExceeded(f"more than {MAX_RENDER_STEPS:,} steps")

    def output(self, n: int) -> None:
        """Spend n rendered characters."""
        self.chars -= n
        if self.chars < 0:
            raise TemplateBudgetExceeded(f"more than {MAX_RENDER_CHARS:,} characters rendered")


_BUDGET: ContextVar[RenderBudget | None] = ContextVar("megapack_render_budget", default=None)


@contextmanager
def render_budget() -> Iterator[RenderBudget]:
    """The budget of the record being rendered: a new one, or the one already in force (one per record)."""
    current = _BUDGET.get()
    if current is not None:
        yield current
        return
    budget = RenderBudget()
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def _step() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.step()


def _check_size(size: int, what: str) -> None:
    if size > MAX_RENDER_CHARS:
        raise TemplateBudgetExceeded(f"{what} would make {size:,} items, more than {MAX_RENDER_CHARS:,}")


class _CountedRange:
    """`range` for templates: the sandbox's bounded range whose every step is spent from the budget."""

    def __init__(self, *args: int) -> None:
        self._range = safe_range(*args)

    def __iter__(self):
        for value in self._range:
            _step()
            yield value

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, index):
        return self._range[index]


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with every call, lookup and large-result operator checked against the render budget."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        _step()
        if getattr(__obj, "__name__", "") in ("format", "format_map") and isinstance(getattr(__obj, "__self__", None), str):
            _check_format(__obj.__self__)
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        _step()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _step()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator, left, right):
        _step()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    _check_size(len(seq) * n, "repeating a sequence")
            if isinstance(left, int) and isinstance(right, int):
                _check_size((left.bit_length() + right.bit_length()) // 8, "multiplying integers")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            _check_size(left.bit_length() * right // 8, "a power")
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
        return super().call_binop(context, operator, left, right)


def _check_format(fmt: str) -> None:
    if _BIG_NUMBER.search(fmt):
        raise TemplateBudgetExceeded("a format width or precision of 10^8 or more")


def _bounded_filter(f):
    """A filter whose integer arguments (widths, counts) cannot ask for more than the budget's length."""
    def bounded(*args, **kwargs):
        _step()
        for value in (*args[1:], *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool):
                _check_size(abs(value), f"the filter {getattr(f, '__name__', 'filter')}")
        return f(*args, **kwargs)

    for attr in ("jinja_pass_arg",):  # keep jinja's pass_context / pass_environment markers
        if hasattr(f, attr):
            setattr(bounded, attr, getattr(f, attr))
    return bounded


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`: records the character span of its output while tracking."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.CallBlock(self.call_method("_span"), [], [], body).set_lineno(lineno)

    def _span(self, caller) -> str:
        text = caller()
        track = GENERATION_SPANS.get()
        if track is not None:
            track["spans"].append((track["pos"], track["pos"] + len(text)))
        return text


class _Namespace(jinja2.utils.Namespace):
    """transformers' namespace: no underscore-prefixed attributes (no way to CPython internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


class _Dict:
    """transformers' `dict` global: calling and fromkeys only."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def make_environment(today: date | None) -> ImmutableSandboxedEnvironment:
    """A jinja environment with transformers' settings, filters and globals; strftime_now returns `today`."""
    def strftime_now(fmt):
        if today is None:
            raise jinja2.exceptions.TemplateError("strftime_now needs --template-date")
        return datetime(today.year, today.month, today.day).strftime(fmt)

    env = _BudgetedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=_raise_exception, strftime_now=strftime_now, dict=_Dict(),
                       namespace=_Namespace, range=_CountedRange)
    return env


def parse_date(value: str | None) -> date | None:
    """--template-date YYYY-MM-DD."""
    if value is None:
        return None
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            return date.fromisoformat(value)
    except ValueError:
        pass
    raise MegapackError(f"--template-date {value!r}: expected a date as YYYY-MM-DD")


def find_template_dir(path: str | Path) -> Path:
    """The folder holding the chat template: `path` itself, a tokenizer file's folder, or the folder above `original/`."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    for candidate in (folder, folder.parent if folder.name == "original" else None):
        if candidate is not None and ((candidate / "chat_template.jinja").is_file()
                                      or (candidate / "tokenizer_config.json").is_file()):
            return candidate
    raise MegapackError(f"{path}: no chat_template.jinja or tokenizer_config.json there; --template hf needs a "
                        f"checkpoint folder (pass --chat-template-from DIR)")


def read_template_files(folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """({name: template source}, {bos_token: ..., ...}) from a checkpoint folder."""
    config: dict = {}
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MegapackError(f"{config_path}: unreadable tokenizer config ({exc})") from None
        except RecursionError:
            raise nested_too_deeply(config_path) from None
    specials = {}
    for key in _SPECIAL_KEYS:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            specials[key] = value
    jinja_path = folder / "chat_template.jinja"
    if jinja_path.is_file():
        return {"default": jinja_path.read_text(encoding="utf-8")}, specials
    raw = config.get("chat_template")
    if isinstance(raw, str):
        return {"default": raw}, specials
    if isinstance(raw, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                     and isinstance(t.get("template"), str) for t in raw) and raw:
        return {t["name"]: t["template"] for t in raw}, specials
    raise MegapackError(f"{config_path}: no chat_template (expected a string or a list of {{name, template}})")
