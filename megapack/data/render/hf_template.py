"""`--template hf`: render with a checkpoint's own jinja `chat_template`, as transformers' `apply_chat_template` does.

The template comes from a checkpoint folder (`chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`,
a string or a list of named templates: "tool_use" for records with tools, else "default"). It runs in jinja2's
ImmutableSandboxedEnvironment with transformers' settings (trim_blocks, lstrip_blocks, loopcontrols, the
`{% generation %}` tag) and globals (`raise_exception`, `tojson` without HTML escaping, `dict`, `namespace`,
`strftime_now`), except that `strftime_now` returns the `--template-date` (a template that calls it without one is
refused: preprocessing must not depend on the day it runs). `bos_token`, `eos_token`, `unk_token` and `pad_token`
come from `tokenizer_config.json`, else from the tokenizer. The environment and the template files: `hf_jinja`.

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
from datetime import date
from pathlib import Path

import jinja2
import jinja2.meta
import numpy as np

from megapack.data.render import tool_calls as toolfmt
from megapack.data.render.hf_jinja import (
    GENERATION_SPANS, GENERATION_TAG, TemplateBudgetExceeded, find_template_dir, make_environment, read_template_files,
    render_budget,
)
from megapack.data.render.templates import TEMPLATES, TemplateOptions
from megapack.data.render.tokenizer_base import Tokenizer
from megapack.data.render.tool_calls import (
    EMPTY_MASK, NO_TOOL_FORMAT, PREFIX_UNSTABLE, TEMPLATE_BUDGET, TEMPLATE_ERROR, UnrenderableRecord,
)
from megapack.data.sources.conversation import ASSISTANT, FUNCTION_CALL, OBSERVATION, Conversation, Document, Record
from megapack.errors import MegapackError

HF_TEMPLATE_VERSION = 1  # bump when rendering or masking semantics change
_MS, _ME = "\ufdd0", "\ufdd1"  # noncharacters marking special-token strings that came from the data


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
        self._features = {key: (bool(GENERATION_TAG.search(src)),
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

    def messages(self, record: Conversation, options: TemplateOptions) -> tuple[list[dict], list[dict] | None]:
        """The conversation as Hugging Face chat messages (function calls as tool_calls, observations as tool)."""
        system = record.system if options.use_data_system and record.system else options.default_system
        out = [{"role": "system", "content": system}] if system else []
        for m in record.messages:
            if m.role == FUNCTION_CALL:
                calls = [{"type": "function", "function": c} for c in toolfmt.parse_calls(m.content)]
                out.append({"role": "assistant", "tool_calls": calls})
            else:
                out.append({"role": "tool" if m.role == OBSERVATION else m.role, "content": m.content})
        return out, toolfmt.parse_tools(record.tools)

    def _key(self, tools) -> str:
        """Which named template renders a record (transformers' choice: "tool_use" for records with tools)."""
        if tools is not None and "tool_use" in self._compiled:
            return "tool_use"
        if "default" in self._compiled:
            return "default"
        raise UnrenderableRecord(TEMPLATE_ERROR,
                                 f"{self.origin}: no 'default' chat template among {sorted(self._compiled)}")

    def render(self, messages: list[dict], tools, add_generation_prompt: bool, tokenizer: Tokenizer,
               track: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """(rendered text with data special-token strings marked, generation spans when `track`)."""
        compiled = self._compiled[self._key(tools)]
        kwargs = {**self._kwargs(tokenizer), "messages": messages, "tools": tools, "documents": None,
                  "add_generation_prompt": add_generation_prompt}
        state = {"pos": 0, "spans": []}
        token = GENERATION_SPANS.set(state if track else None)
        try:
            with render_budget() as budget:
                blocks = []
                for block in compiled.generate(**kwargs):
                    budget.output(len(block))
                    blocks.append(block)
                    state["pos"] += len(block)
                return "".join(blocks), state["spans"]
        except TemplateBudgetExceeded as exc:
            raise UnrenderableRecord(TEMPLATE_BUDGET, f"{self.origin}: {exc}") from None
        except Exception as exc:  # only template code runs here: whatever it raises is the template's error
            raise UnrenderableRecord(TEMPLATE_ERROR, f"{type(exc).__name__}: {exc}") from None
        finally:
            GENERATION_SPANS.reset(token)

    def _mark(self, obj, names: re.Pattern):
        """Wrap special-token strings inside data strings in markers, so that they stay text."""
        if isinstance(obj, str):
            if _MS in obj or _ME in obj:
                raise UnrenderableRecord(TEMPLATE_ERROR, "the text holds U+FDD0/U+FDD1, which mark special-token strings")
            return names.sub(lambda m: _MS + m.group(0) + _ME, obj)
        if isinstance(obj, dict):
            return {k: self._mark(v, names) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._mark(v, names) for v in obj]
        return obj

    def render_text(self, record: Record, tokenizer: Tokenizer, options: TemplateOptions | None = None) -> str:
        """The whole conversation as the template renders it (for display and comparisons)."""
        if isinstance(record, Document):
            return TEMPLATES["plain"].render_text(record, tokenizer, options)
        messages, tools = self.messages(record, options or TemplateOptions())
        text, _ = self.render(messages, tools, False, tokenizer)
        return text.replace(_MS, "").replace(_ME, "")

    def prompt_ids(self, record: Conversation, tokenizer: Tokenizer, options: TemplateOptions | None = None) -> list[int]:
        """Token ids of the conversation with the template's generation prompt (what a model answers after)."""
        messages, tools = self.messages(record, options or TemplateOptions())
        names, split = self._patterns(tokenizer)
        with render_budget():
            full, _ = self.render(self._mark(messages, names), self._mark(tools, names), True, tokenizer)
        atoms = [(m.start(), m.end(), m.group(2)) for m in split.finditer(full)]
        return self._tokens(full, atoms, [], tokenizer)[0]

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
                raise UnrenderableRecord(PREFIX_UNSTABLE, f"message {k} rendered alone: {which} the longer rendering")
            start, end = len(prompt), len(through)
            last = [e for s, e in specials if start < e <= end]
            if last and not full[last[-1]:end].strip():
                end = last[-1]  # whitespace after the end-of-turn token is never generated
            spans.append((start, end))
        return spans

    def encode(self, record: Record, tokenizer: Tokenizer,
               options: TemplateOptions | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(int32 token ids, uint8 loss mask) of one conversation (a Document renders as the plain template)."""
        with render_budget():  # one budget for every rendering of this record
            return self._encode(record, tokenizer, options or TemplateOptions())

    def _encode(self, record: Record, tokenizer: Tokenizer, options: TemplateOptions) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(record, Document):
            return TEMPLATES["plain"].encode(record, tokenizer, options)
        messages, tools = self.messages(record, options)
        key = self._key(tools)
        has_markers, uses_tools, uses_calls = self._features[key]
        if (tools and not uses_tools) or (not uses_calls and any("tool_calls" in m for m in messages)):
            what = "tools" if tools and not uses_tools else "tool calls"
            raise UnrenderableRecord(NO_TOOL_FORMAT, f"{self.origin}: the chat template does not render {what}")
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
        loss_mask = ~inside if options.train_on_prompt and options.mask_history else inside
        if options.train_on_prompt and not options.mask_history:
            loss_mask = np.ones(len(ids), dtype=bool)
        if not loss_mask.any():
            raise UnrenderableRecord(EMPTY_MASK,
                                     "no assistant token is trained (the template renders no assistant content)")
        return np.asarray(ids, dtype=np.int32), loss_mask.astype(np.uint8)

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
                raise UnrenderableRecord(PREFIX_UNSTABLE,
                                         f"a trained span starts or ends inside the special token {name}")
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
                raise UnrenderableRecord(PREFIX_UNSTABLE, f"a trained span starts or ends inside a token: "
                                                 f"{clean[max(0, off - 12):off]!r}|{clean[off:off + 12]!r}")
            bounds.append((len(head), c))
        bounds.append((len(piece), b))
        for (k0, p0), (k1, _) in zip(bounds, bounds[1:]):
            ids += piece[k0:k1]
            starts += [p0] * (k1 - k0)
