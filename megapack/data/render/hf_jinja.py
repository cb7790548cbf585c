"""The jinja side of `--template hf`: transformers' sandboxed environment (settings, filters, globals, the
`{% generation %}` tag that records the spans it renders) and where a checkpoint keeps its chat template
(`chat_template.jinja`, else `tokenizer_config.json`).
"""
from __future__ import annotations

import json
import re
from contextvars import ContextVar
from datetime import date, datetime
from pathlib import Path

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from megapack.errors import MegapackError

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# While HFChatTemplate.render tracks: {"pos": characters rendered so far, "spans": [(start, end), ...]}
GENERATION_SPANS: ContextVar = ContextVar("megapack_generation_spans", default=None)


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

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=strftime_now, dict=_Dict(),
                       namespace=_Namespace)
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
