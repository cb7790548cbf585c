"""Chat templates as data, rendered turn by turn into token ids plus a per-token loss mask.

A template is a handful of turn formats (LLaMA-Factory style). Each format is a tuple of parts: text, where
"{content}" stands for the message content, or `Special` tokens, which are emitted by id and never re-encoded from
text, so "<|eot_id|>" typed by a user stays plain text. Text is encoded in segments that never cross a special token,
a turn, or the boundary between a response's trained part (content + end-of-turn) and the rest, so mask boundaries
fall exactly on token boundaries. A special token the tokenizer lacks (chatml's <|im_start|>/<|im_end|> with a
LLaMA-3 or SentencePiece vocabulary) is written as text within its segment. With SentencePiece each segment starts
with the model's dummy-prefix space, as in LLaMA-Factory's turn-wise encoding ("[/INST]" then "▁Hello").

Loss mask: loss_mask[i] == 1 iff token i is a trained target. By default that is the content of each response turn
(assistant, function_call) and the end-of-turn token that closes it; `train_on_prompt` trains everything,
`mask_history` keeps only the last response turn.

Difference from encoding the fully rendered string (llama3, and any template whose prompt ends with text right
before the response): the prompt's trailing "\\n\\n" (after "<|start_header_id|>assistant<|end_header_id|>") and the
response content are encoded separately, as LLaMA-Factory does. The ids therefore equal the full-string encoding
except when a response content starts with a whitespace run that contains a line break (it matches
``^\\s*[\\r\\n]``): there the full-string encoding may merge "\\n\\n" with that whitespace into one token, while we keep
"\\n\\n" (id 271) as its own token so that the loss mask can start exactly at the content.

Tools (`Conversation.tools`): llama3 renders them in the LLaMA-3.1 JSON tool-calling format and chatml in the
Hermes / Qwen2.5 `<tools>` format (see `tool_calls`); function-call turns are then rewritten into that format and trained,
observations are not. Without a tools column function calls are rendered verbatim. llama2 and plain have no tool
format: a record with tools is a bad record ("tools unsupported by template"), never rendered without them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from megapack.data.sources.conversation import (
    ASSISTANT,
    FUNCTION_CALL,
    OBSERVATION,
    USER,
    Conversation,
    Document,
    Record,
)
from megapack.data.render import tool_calls as toolfmt
from megapack.data.render.tokenizer_base import Tokenizer
from megapack.errors import MegapackError

TEMPLATE_FORMAT_VERSION = 2  # bump when rendering semantics change, so template identities change with them
CONTENT = "{content}"
_LITERAL_IDS: dict[tuple[str, str], list[int]] = {}  # (tokenizer file sha256, template literal) -> ids


@dataclass(frozen=True)
class Special:
    """A special token emitted by id: a token name, or "bos"/"eos" for the tokenizer's own BOS/EOS."""

    name: str
    text_fallback: bool = False  # encode the name as text when the tokenizer lacks the token (chatml markers)


Part = str | Special
Format = tuple[Part, ...]
_Part = tuple[str, list[int], bool, int]  # (text, [special id] or [], text is a template literal, trained flag)


@dataclass(frozen=True)
class TemplateOptions:
    """How a template assigns loss and picks the system prompt."""

    train_on_prompt: bool = False
    mask_history: bool = False
    default_system: str | None = None
    use_data_system: bool = True


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format: per-role turn formats plus the end-of-turn token trained with each response."""

    name: str
    prefix: Format  # once, at the start of the conversation
    system: Format
    user: Format  # ends with the header of the response that follows
    assistant: Format  # exactly CONTENT, then end_of_turn, then optional untrained text
    observation: Format
    function_call: Format
    end_of_turn: Special
    system_in_first_user: bool = False  # llama2: the system block goes inside the first [INST]
    plain: bool = False  # no chat markup: contents joined, loss on every token
    tool_style: str = ""  # "llama3.1-json" or "hermes" (see `tool_calls`); "" = a tools column is refused
    tool_observation: Format = ()  # the observation format when tools are given (hermes: a user turn)

    def __post_init__(self) -> None:
        for fmt in (self.assistant, self.function_call):
            if self.plain:
                continue
            if fmt[:2] != (CONTENT, self.end_of_turn) or any(CONTENT in p for p in fmt[2:] if isinstance(p, str)):
                raise ValueError(f"template {self.name}: a response format must start with {CONTENT!r}, end_of_turn")

    def identity(self, options: TemplateOptions | None = None) -> str:
        """Stable "<name>:<hash>" of the template definition and options, recorded in shard metadata."""
        options = options or TemplateOptions()
        blob = json.dumps({"version": TEMPLATE_FORMAT_VERSION, "template": dataclasses.asdict(self),
                           "options": dataclasses.asdict(options)}, sort_keys=True, ensure_ascii=False)
        return f"{self.name}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    def encode(self, record: Conversation | Document, tokenizer: Tokenizer,
               options: TemplateOptions | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(int32 token ids, uint8 loss mask of the same length) for one conversation or document."""
        options = options or TemplateOptions()
        pieces = self._pieces(record, tokenizer, options)
        ids: list[int] = []
        loss_mask: list[int] = []
        for piece_ids, trained in pieces:
            ids += piece_ids
            loss_mask += [trained] * len(piece_ids)
        return np.asarray(ids, dtype=np.int32), np.asarray(loss_mask, dtype=np.uint8)

    def prompt_ids(self, record: Conversation, tokenizer: Tokenizer, options: TemplateOptions | None = None) -> list[int]:
        """Token ids of a conversation ending on a prompt turn, with the response header (what a model answers
        after); the plain template ends the text without EOS."""
        ids, _ = self.encode(record, tokenizer, options)
        return ids.tolist()[:-1] if self.plain else ids.tolist()

    def render_text(self, record: Conversation | Document, tokenizer: Tokenizer,
                    options: TemplateOptions | None = None) -> str:
        """The conversation as one string with special tokens written by name (for display and comparisons)."""
        options = options or TemplateOptions()
        names = {i: name for name, i in tokenizer.special_tokens.items()}
        return "".join((names.get(ids[0]) or tokenizer.decode(ids)) if ids else text
                       for text, ids, _, _ in self._parts(record, tokenizer, options))

    def _pieces(self, record: Record, tokenizer: Tokenizer, options: TemplateOptions) -> list[tuple[list[int], int]]:
        out = []
        for text, special_ids, constant, trained in self._parts(record, tokenizer, options):
            if special_ids:
                out.append((special_ids, trained))
            elif constant:  # template literals ("user", "\n\n", ...) are encoded once per tokenizer
                key = (tokenizer.file_sha256, text)
                ids = _LITERAL_IDS.get(key)
                if ids is None:
                    ids = _LITERAL_IDS[key] = tokenizer.encode(text)
                out.append((ids, trained))
            else:
                out.append((tokenizer.encode(text), trained))
        return out

    def _parts(self, record: Record, tokenizer: Tokenizer, options: TemplateOptions) -> Iterator[_Part]:
        """Yield (text, [id] if special else [], is_literal_text, trained) for every part of the record, in order."""
        if isinstance(record, Document):
            yield from self._plain(tokenizer, [record.text])
            return
        if not isinstance(record, Conversation):
            raise TypeError(f"expected a Conversation or Document, got {type(record).__name__}")
        system = record.system if options.use_data_system and record.system else options.default_system
        tools = toolfmt.parse_tools(record.tools)
        if tools and not self.tool_style:
            raise toolfmt.UnrenderableRecord(toolfmt.NO_TOOL_FORMAT, f"template {self.name!r} has no tool format; "
                                    "use llama3, chatml or hf for records with a tools column")
        if self.plain:
            yield from self._plain(tokenizer, ([system] if system else []) + [m.content for m in record.messages])
            return
        responses = [i for i, m in enumerate(record.messages) if m.role in (ASSISTANT, FUNCTION_CALL)]
        last_response = responses[-1] if responses else -1
        prompt_flag = int(options.train_on_prompt)
        if tools and self.tool_style == "hermes":
            system = toolfmt.hermes_system(system, tools)

        yield from self._format(self.prefix, "", tokenizer, prompt_flag)
        if system and not self.system_in_first_user:
            yield from self._format(self.system, system, tokenizer, prompt_flag)
        first_user = True
        for i, message in enumerate(record.messages):
            if message.role in (ASSISTANT, FUNCTION_CALL):
                fmt = self.assistant if message.role == ASSISTANT else self.function_call
                trained = int(not options.mask_history or i == last_response)
                content = message.content
                if tools and message.role == FUNCTION_CALL:
                    call = toolfmt.llama31_call if self.tool_style == "llama3.1-json" else toolfmt.hermes_call
                    content = call(content)
                # the first two parts are the content and the end-of-turn token (checked in __post_init__)
                yield from self._format(fmt[:2], content, tokenizer, trained)
                yield from self._format(fmt[2:], content, tokenizer, prompt_flag)
            elif message.role in (USER, OBSERVATION):
                content = message.content
                if message.role == USER and i == 0 and system and self.system_in_first_user:
                    content = self._join(self.system, system) + content
                if message.role == USER and first_user and tools and self.tool_style == "llama3.1-json":
                    content = toolfmt.llama31_user_prefix(tools) + content
                first_user = first_user and message.role != USER
                fmt = self.user if message.role == USER else self.observation
                if message.role == OBSERVATION and tools and self.tool_observation:
                    fmt, content = self.tool_observation, toolfmt.hermes_observation(content)
                yield from self._format(fmt, content, tokenizer, prompt_flag)
            else:
                raise MegapackError(f"{record.source or 'conversation'}: role {message.role!r} cannot be a turn; "
                                    f"expected user, assistant, function_call or observation")

    def _format(self, fmt: Format, content: str, tokenizer: Tokenizer, trained: int) -> Iterator[_Part]:
        """Parts of one format; adjacent text (including specials the tokenizer lacks) is encoded as one string."""
        buffer: list[str] = []
        literal = True
        for part in fmt:
            token = self._special_id(part, tokenizer) if isinstance(part, Special) else None
            if token is not None:
                if buffer:
                    yield "".join(buffer), [], literal, trained
                    buffer, literal = [], True
                yield "", [token], False, trained
            elif isinstance(part, Special):
                buffer.append(part.name)
            elif part:
                buffer.append(part.replace(CONTENT, content))
                literal = literal and CONTENT not in part
        if buffer:
            yield "".join(buffer), [], literal, trained

    def _special_id(self, special: Special, tokenizer: Tokenizer) -> int | None:
        if special.name == "bos":
            return tokenizer.bos_id
        if special.name == "eos":
            return tokenizer.eos_id
        token = tokenizer.special_tokens.get(special.name)
        if token is None and not special.text_fallback:
            raise MegapackError(f"template {self.name!r} needs special token {special.name!r}, which tokenizer "
                                f"{tokenizer.kind} ({tokenizer.path}) lacks; choose a template for this tokenizer")
        return token

    @staticmethod
    def _join(fmt: Format, content: str) -> str:
        if any(isinstance(p, Special) for p in fmt):
            raise ValueError("a format merged into text must be text only")
        return "".join(p.replace(CONTENT, content) for p in fmt)

    def _plain(self, tokenizer: Tokenizer, texts: list[str]) -> Iterator[_Part]:
        """BOS, the texts separated by blank lines, EOS; every token trained."""
        yield "", [tokenizer.bos_id], False, 1
        for k, text in enumerate(texts):
            yield (text if k == 0 else "\n\n" + text), [], False, 1
        yield "", [tokenizer.eos_id], False, 1


_START, _END, _EOT = Special("<|start_header_id|>"), Special("<|end_header_id|>"), Special("<|eot_id|>")
_IM_START, _IM_END = Special("<|im_start|>", text_fallback=True), Special("<|im_end|>", text_fallback=True)
_BOS, _EOS = Special("bos"), Special("eos")


def _llama3_header(role: str) -> Format:
    return (_START, role, _END, "\n\n")


TEMPLATES: dict[str, ChatTemplate] = {
    # <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
    # <|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n
    # {assistant}<|eot_id|>...; tool results come back in the "ipython" role.
    "llama3": ChatTemplate(
        name="llama3",
        prefix=(_BOS,),
        system=(_START, "system", _END, "\n\n" + CONTENT, _EOT),
        user=(_START, "user", _END, "\n\n" + CONTENT, _EOT) + _llama3_header("assistant"),
        assistant=(CONTENT, _EOT),
        observation=(_START, "ipython", _END, "\n\n" + CONTENT, _EOT) + _llama3_header("assistant"),
        function_call=(CONTENT, _EOT),
        end_of_turn=_EOT,
        tool_style="llama3.1-json",
    ),
    # <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]{assistant}</s><s>[INST] {user} [/INST]...
    "llama2": ChatTemplate(
        name="llama2",
        prefix=(),
        system=("<<SYS>>\n" + CONTENT + "\n<</SYS>>\n\n",),
        user=(_BOS, "[INST] " + CONTENT + " [/INST]"),
        assistant=(CONTENT, _EOS),
        observation=(_BOS, "[INST] " + CONTENT + " [/INST]"),
        function_call=(CONTENT, _EOS),
        end_of_turn=_EOS,
        system_in_first_user=True,
    ),
    # <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n
    # {assistant}<|im_end|>\n; the markers are text when the tokenizer has no such special tokens (LLaMA-3 has none).
    "chatml": ChatTemplate(
        name="chatml",
        prefix=(_BOS,),
        system=(_IM_START, "system\n" + CONTENT, _IM_END, "\n"),
        user=(_IM_START, "user\n" + CONTENT, _IM_END, "\n", _IM_START, "assistant\n"),
        assistant=(CONTENT, _IM_END, "\n"),
        observation=(_IM_START, "tool\n" + CONTENT, _IM_END, "\n", _IM_START, "assistant\n"),
        function_call=(CONTENT, _IM_END, "\n"),
        end_of_turn=_IM_END,
        tool_style="hermes",
        tool_observation=(_IM_START, "user\n" + CONTENT, _IM_END, "\n", _IM_START, "assistant\n"),
    ),
    # BOS, texts joined by blank lines, EOS; loss on every token.
    "plain": ChatTemplate(
        name="plain", prefix=(), system=(), user=(), assistant=(), observation=(), function_call=(),
        end_of_turn=_EOS, plain=True,
    ),
}


def get_template(name: str) -> ChatTemplate:
    """The built-in template called `name` (llama3, llama2, chatml, plain)."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise MegapackError(f"unknown chat template {name!r}; expected one of: {', '.join(TEMPLATES)}") from None
