"""`--template hf`: render with a checkpoint's own jinja `chat_template`, as transformers' `apply_chat_template` does.

The template comes from a checkpoint folder (`chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`,
a string or a list of named templates: "tool_use" for records with tools, else "default"). It runs in jinja2's
ImmutableSandboxedEnvironment with transformers' settings (trim_blocks, lstrip_blocks, loopcontrols, the
`{% generation %}` tag) and globals (`raise_exception`, `tojson` without HTML escaping, `dict`, `namespace`,
`strftime_now`), except that `strftime_now` returns the `--template-date` (a template that calls it without one is
refused: preprocessing must not depend on the day it runs). `bos_token`, `eos_token`, `unk_token` and `pad_token`
come from `tokenizer_config.json`, else from the tokenizer.

Token ids: the rendered text is cut at the special tokens the template wrote, which are emitted by id, and every
piece in between is encoded as text, which is what `apply_chat_template(tokenize=True)` does. Special-token strings
inside message content, tool schemas or calls are marked before rendering and stay text (as in the built-in
templates); `apply_chat_template` would turn them into control tokens (unless `sanitize_control_tokens=True`, which
also encodes each such string apart from the text around it, where we encode the text in one piece).

Loss mask: the character spans of `{% generation %}` blocks when the template has them; otherwise, for each
assistant message k, the text between the rendering of messages[:k] with the generation prompt and the rendering of
messages[:k+1], without whitespace that follows the turn's last special token (ChatML's "\\n" after <|im_end|>).
Each span must start and end on a token boundary of the full rendering, and each partial rendering must be a prefix
of the full one; a record where that fails is a bad record ("not prefix-stable"), and one without any trained token is
one too ("empty assistant mask"): never an all-ones or all-zeros mask.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from contextvars import ContextVar
from datetime import date, datetime
from pathlib import Path

import jinja2
import jinja2.meta
import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from megapack.data.render import tool_calls as toolfmt
from megapack.data.render.templates import TEMPLATES, TemplateOptions
from megapack.data.render.tokenizer_base import Tokenizer
from megapack.data.render.tool_calls import EMPTY_MASK, NO_TOOL_FORMAT, PREFIX_UNSTABLE, TEMPLATE_ERROR, BadSample
from megapack.data.sources.conversation import ASSISTANT, FUNCTION_CALL, OBSERVATION, Conversation, Document, Sample
from megapack.errors import MegapackError

HF_TEMPLATE_VERSION = 1  # bump when rendering or masking semantics change
_MS, _ME = "\ufdd0", "\ufdd1"  # noncharacters marking special-token strings that came from the data
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_TRACK: ContextVar = ContextVar("megapack_generation_spans", default=None)


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`: records the character span of its output while tracking."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.CallBlock(self.call_method("_span"), [], [], body).set_lineno(lineno)

    def _span(self, caller) -> str:
        text = caller()
        track = _TRACK.get()
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


class HFChatTemplate:
    """A checkpoint's chat template with the encode / render_text / identity interface of the built-in ones."""

    name = "hf"

    def __init__(self, sources: dict[str, str], specials: dict[str, str] | None = None, today: date | None = None,
                 origin: str = "chat template"):
        self.sources, self.specials, self.today, self.origin = dict(sources), dict(specials or {}), today, origin
        env = make_environment(today)
        self._compiled = {}
        for key, source in self.sources.items():
            if "strftime_now" in source and today is None:
                raise MegapackError(f"{origin}: the chat template calls strftime_now (today's date); pass "
                                    "--template-date YYYY-MM-DD so that preprocessing is reproducible")
            try:
                self._compiled[key] = env.from_string(source)
            except jinja2.exceptions.TemplateSyntaxError as exc:
                raise MegapackError(f"{origin}: chat template {key!r} line {exc.lineno}: {exc.message}") from None
        self._split: dict[str, tuple[re.Pattern, re.Pattern]] = {}
        # what each template can render: the `{% generation %}` tag, a tools list, tool calls
        self._features = {key: (bool(_GENERATION_TAG.search(src)),
                                "tools" in jinja2.meta.find_undeclared_variables(env.parse(src)), "tool_calls" in src)
                          for key, src in self.sources.items()}

    @classmethod
    def from_dir(cls, path: str | Path, today: date | None = None) -> "HFChatTemplate":
        """Load the chat template of a checkpoint folder (or of the folder of a tokenizer file in it)."""
        folder = find_template_dir(path)
        sources, specials = read_template_files(folder)
        return cls(sources, specials, today, origin=str(folder))

    def identity(self, options: TemplateOptions | None = None) -> str:
        """Stable "hf:<hash>" of the template sources, special-token strings, date and options."""
        blob = json.dumps({"version": HF_TEMPLATE_VERSION, "sources": self.sources, "specials": self.specials,
                           "date": self.today.isoformat() if self.today else None,
                           "options": dataclasses.asdict(options or TemplateOptions())},
                          sort_keys=True, ensure_ascii=False)
        return f"hf:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    # ---- rendering ---------------------------------------------------------------------------------------------

    def _patterns(self, tokenizer: Tokenizer) -> tuple[re.Pattern, re.Pattern]:
        """(special-token names; the split pattern: (1) a marked name, (2) a name the template wrote, a lone marker)."""
        key = tokenizer.file_sha256
        if key not in self._split:
            names = "|".join(map(re.escape, sorted(tokenizer.special_tokens, key=len, reverse=True))) or "(?!)"
            self._split[key] = (re.compile(names), re.compile(f"{_MS}({names}){_ME}|({names})|[{_MS}{_ME}]"))
        return self._split[key]

    def _kwargs(self, tokenizer: Tokenizer) -> dict:
        names = {i: n for n, i in tokenizer.special_tokens.items()}
        fallback = {"bos_token": names.get(tokenizer.bos_id), "eos_token": names.get(tokenizer.eos_id)}
        return {k: v for k, v in {**fallback, **self.specials}.items() if v is not None}

    def messages(self, sample: Conversation, options: TemplateOptions) -> tuple[list[dict], list[dict] | None]:
        """The conversation as Hugging Face chat messages (function calls as tool_calls, observations as tool)."""
        system = sample.system if options.use_data_system and sample.system else options.default_system
        out = [{"role": "system", "content": system}] if system else []
        for m in sample.messages:
            if m.role == FUNCTION_CALL:
                calls = [{"type": "function", "function": c} for c in toolfmt.parse_calls(m.content)]
                out.append({"role": "assistant", "tool_calls": calls})
            else:
                out.append({"role": "tool" if m.role == OBSERVATION else m.role, "content": m.content})
        return out, toolfmt.parse_tools(sample.tools)

    def _key(self, tools) -> str:
        """Which named template renders a record (transformers' choice: "tool_use" for records with tools)."""
        if tools is not None and "tool_use" in self._compiled:
            return "tool_use"
        if "default" in self._compiled:
            return "default"
        raise BadSample(TEMPLATE_ERROR, f"{self.origin}: no 'default' chat template among {sorted(self._compiled)}")

    def render(self, messages: list[dict], tools, add_generation_prompt: bool, tokenizer: Tokenizer,
               track: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """(rendered text with data special-token strings marked, generation spans when `track`)."""
        compiled = self._compiled[self._key(tools)]
        kwargs = {**self._kwargs(tokenizer), "messages": messages, "tools": tools, "documents": None,
                  "add_generation_prompt": add_generation_prompt}
        state = {"pos": 0, "spans": []}
        token = _TRACK.set(state if track else None)
        try:
            blocks = []
            for block in compiled.generate(**kwargs):
                blocks.append(block)
                state["pos"] += len(block)
            return "".join(blocks), state["spans"]
        except Exception as exc:  # only template code runs here: whatever it raises is the template's error
            raise BadSample(TEMPLATE_ERROR, f"{type(exc).__name__}: {exc}") from None
        finally:
            _TRACK.reset(token)

    def _mark(self, obj, names: re.Pattern):
        """Wrap special-token strings inside data strings in markers, so that they stay text."""
        if isinstance(obj, str):
            if _MS in obj or _ME in obj:
                raise BadSample(TEMPLATE_ERROR, "the text holds U+FDD0/U+FDD1, which mark special-token strings")
            return names.sub(lambda m: _MS + m.group(0) + _ME, obj)
        if isinstance(obj, dict):
            return {k: self._mark(v, names) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._mark(v, names) for v in obj]
        return obj

    def render_text(self, sample: Sample, tokenizer: Tokenizer, options: TemplateOptions | None = None) -> str:
        """The whole conversation as the template renders it (for display and comparisons)."""
        if isinstance(sample, Document):
            return TEMPLATES["plain"].render_text(sample, tokenizer, options)
        messages, tools = self.messages(sample, options or TemplateOptions())
        text, _ = self.render(messages, tools, False, tokenizer)
        return text.replace(_MS, "").replace(_ME, "")

    # ---- ids and mask ------------------------------------------------------------------------------------------

    def _spans(self, messages, tools, tokenizer, full: str, specials: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Trained character spans of `full` by incremental rendering (templates without generation markers)."""
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != ASSISTANT:
                continue
            prompt, _ = self.render(messages[:k], tools, True, tokenizer)
            through, _ = self.render(messages[:k + 1], tools, False, tokenizer)
            if not through.startswith(prompt) or not full.startswith(through):
                which = "its prompt is not a prefix of" if not through.startswith(prompt) else "it is not a prefix of"
                raise BadSample(PREFIX_UNSTABLE, f"message {k} rendered alone: {which} the longer rendering")
            start, end = len(prompt), len(through)
            last = [e for s, e in specials if start < e <= end]
            if last and not full[last[-1]:end].strip():
                end = last[-1]  # whitespace after the end-of-turn token is never generated
            spans.append((start, end))
        return spans

    def encode(self, sample: Sample, tokenizer: Tokenizer,
               options: TemplateOptions | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(int32 token ids, uint8 loss mask) of one conversation (a Document renders as the plain template)."""
        options = options or TemplateOptions()
        if isinstance(sample, Document):
            return TEMPLATES["plain"].encode(sample, tokenizer, options)
        messages, tools = self.messages(sample, options)
        key = self._key(tools)
        has_markers, uses_tools, uses_calls = self._features[key]
        if (tools and not uses_tools) or (not uses_calls and any("tool_calls" in m for m in messages)):
            what = "tools" if tools and not uses_tools else "tool calls"
            raise BadSample(NO_TOOL_FORMAT, f"{self.origin}: the chat template does not render {what}")
        names, split = self._patterns(tokenizer)
        messages, tools = self._mark(messages, names), self._mark(tools, names)
        full, spans = self.render(messages, tools, False, tokenizer, track=has_markers)
        atoms = [(m.start(), m.end(), m.group(2)) for m in split.finditer(full)]
        specials = [(s, e) for s, e, name in atoms if name is not None]
        if not has_markers:
            spans = self._spans(messages, tools, tokenizer, full, specials)
        spans = [(s, e) for s, e in spans if e > s]
        if options.mask_history:
            spans = spans[-1:] if not options.train_on_prompt else spans[:-1]
        cuts = sorted({p for span in spans for p in span})
        ids, starts = self._tokens(full, atoms, cuts, tokenizer)
        inside = np.zeros(len(ids), dtype=bool)
        for s, e in spans:
            inside |= (starts >= s) & (starts < e)
        mask = ~inside if options.train_on_prompt and options.mask_history else inside
        if options.train_on_prompt and not options.mask_history:
            mask = np.ones(len(ids), dtype=bool)
        if not mask.any():
            raise BadSample(EMPTY_MASK, "no assistant token is trained (the template renders no assistant content)")
        return np.asarray(ids, dtype=np.int32), mask.astype(np.uint8)

    def _tokens(self, full: str, atoms, cuts: list[int], tokenizer: Tokenizer) -> tuple[list[int], np.ndarray]:
        """Token ids of `full` and each token's start position; pieces are cut at `cuts`, which must be boundaries."""
        ids: list[int] = []
        starts: list[int] = []
        pos = 0
        for s, e, name in atoms:
            if name is None and e == s + 1:
                self._text(full, pos, s, cuts, tokenizer, ids, starts)  # a lone marker: drop it, break the text
                pos = e
                continue
            if name is None:
                continue  # a marked special-token string: part of the text around it
            self._text(full, pos, s, cuts, tokenizer, ids, starts)
            if any(s < c < e for c in cuts):
                raise BadSample(PREFIX_UNSTABLE, f"a trained span starts or ends inside the special token {name}")
            ids.append(tokenizer.special_tokens[name])
            starts.append(s)
            pos = e
        self._text(full, pos, len(full), cuts, tokenizer, ids, starts)
        return ids, np.asarray(starts, dtype=np.int64)

    @staticmethod
    def _text(full: str, a: int, b: int, cuts: list[int], tokenizer: Tokenizer, ids: list, starts: list) -> None:
        if a >= b:
            return
        raw = full[a:b]
        clean = raw.replace(_MS, "").replace(_ME, "")
        piece = tokenizer.encode(clean)
        bounds = [(0, a)]
        for c in (c for c in cuts if a < c < b):
            off = c - a - raw.count(_MS, 0, c - a) - raw.count(_ME, 0, c - a)
            head = tokenizer.encode(clean[:off])
            if piece[:len(head)] != head:
                raise BadSample(PREFIX_UNSTABLE, f"a trained span starts or ends inside a token: "
                                                 f"{clean[max(0, off - 12):off]!r}|{clean[off:off + 12]!r}")
            bounds.append((len(head), c))
        bounds.append((len(piece), b))
        for (k0, p0), (k1, _) in zip(bounds, bounds[1:]):
            ids += piece[k0:k1]
            starts += [p0] * (k1 - k0)
