"""Tool schemas and tool calls: parsed from a Conversation and written in the built-in templates' tool formats.

The `tools` column (LLaMA-Factory's sharegpt/openai tool datasets, e.g. glaive_toolcall_en_demo) is a JSON list of
function schemas ({"name", "description", "parameters"}), and a function_call turn is a JSON call
{"name", "arguments"} (or a list of them). Schemas are wrapped as {"type": "function", "function": schema}, as
LLaMA-Factory and Hugging Face chat templates expect them.

Built-in formats (both as their checkpoints' own chat templates write them, so that `--template hf` with such a
checkpoint renders the same text):
- llama3, the LLaMA-3.1 JSON tool-calling format: the schemas (JSON, indent 4) go into the first user message after
  a fixed instruction; a call is `{"name": ..., "parameters": {...}}` (one call per turn).
- chatml, the Hermes / Qwen2.5 `<tools>` format: the schemas (one JSON line each) go into the system turn inside
  `<tools></tools>`; each call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`; a tool result is
  a user turn `<tool_response>\\n...\\n</tool_response>`.
"""
from __future__ import annotations

import json
from typing import Any

from megapack.data.sources.limits import DEFAULT_MAX_DEPTH, measure, may_be_too_deep
from megapack.errors import MegapackError


class UnrenderableRecord(MegapackError):
    """A record a template cannot render; `reason` is its bad-record category (counted, reported)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


BAD_TOOLS, BAD_CALL, NO_TOOL_FORMAT = "bad tools column", "bad tool call", "tools unsupported by template"
PREFIX_UNSTABLE, EMPTY_MASK, TEMPLATE_ERROR = "not prefix-stable", "empty assistant mask", "chat template error"
TEMPLATE_BUDGET = "template budget exceeded"
# Every reason a template can reject a record for (besides "template error" and "empty after tokenization").
RENDER_REASONS = (NO_TOOL_FORMAT, BAD_TOOLS, BAD_CALL, TEMPLATE_ERROR, TEMPLATE_BUDGET, PREFIX_UNSTABLE, EMPTY_MASK)

LLAMA31_TOOL_PROMPT = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    "best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
HERMES_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                     "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
HERMES_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                     "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                     '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _dumps(value: Any, indent: int | None = None) -> str:
    """JSON as Hugging Face's `tojson` filter writes it (no ASCII escaping, default separators)."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _loads(text: str) -> Any:
    """json.loads of a JSON value held in a record's string, within the record depth limit (ValueError past it)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError("nested deeper than Python's JSON parser allows") from None
    deep = may_be_too_deep(text.encode(), DEFAULT_MAX_DEPTH)
    if deep and measure(value, DEFAULT_MAX_DEPTH, 1 << 62)[0] > DEFAULT_MAX_DEPTH:
        raise ValueError(f"nested deeper than {DEFAULT_MAX_DEPTH} levels")
    return value


def parse_tools(tools: str | None) -> list[dict] | None:
    """The tools column as a list of {"type": "function", "function": schema}; None when there is none."""
    if tools is None or not tools.strip():
        return None
    try:
        value = _loads(tools)
    except ValueError as exc:
        raise UnrenderableRecord(BAD_TOOLS, f"tools is not JSON ({exc})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise UnrenderableRecord(BAD_TOOLS, "tools must be a JSON list of function schemas (objects)")
    if not value:
        return None
    out = []
    for i, tool in enumerate(value):
        schema = tool["function"] if tool.get("type") == "function" and isinstance(tool.get("function"), dict) else tool
        if not isinstance(schema.get("name"), str):
            raise UnrenderableRecord(BAD_TOOLS, f"tools[{i}] has no string 'name'")
        out.append({"type": "function", "function": schema})
    return out


def parse_calls(content: str) -> list[dict]:
    """A function_call turn as a list of {"name": str, "arguments": object}."""
    try:
        value = _loads(content)
    except ValueError as exc:
        raise UnrenderableRecord(BAD_CALL, f"function_call is not JSON ({exc}): {content[:60]!r}") from None
    calls = value if isinstance(value, list) else [value]
    out = []
    for i, call in enumerate(calls):
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise UnrenderableRecord(BAD_CALL, f"function_call[{i}] is not an object with a string 'name'")
        args = call.get("arguments", call.get("parameters", {}))
        if isinstance(args, str):  # OpenAI writes arguments as a JSON string
            try:
                args = _loads(args)
            except ValueError as exc:
                raise UnrenderableRecord(BAD_CALL,
                                         f"function_call[{i}] arguments are not JSON ({exc}): {args[:60]!r}") from None
        out.append({"name": call["name"], "arguments": args})
    if not out:
        raise UnrenderableRecord(BAD_CALL, "function_call holds no call")
    return out


def llama31_user_prefix(tools: list[dict]) -> str:
    """Text put before the first user message when tools are given (LLaMA-3.1 JSON tool calling)."""
    return LLAMA31_TOOL_PROMPT + "".join(_dumps(t, indent=4) + "\n\n" for t in tools)


def llama31_call(content: str) -> str:
    """A function_call turn in the LLaMA-3.1 JSON format: {"name": ..., "parameters": ...}."""
    calls = parse_calls(content)
    if len(calls) != 1:
        raise UnrenderableRecord(BAD_CALL, f"{len(calls)} calls in one turn; the LLaMA-3.1 format allows one")
    return '{"name": "' + calls[0]["name"] + '", "parameters": ' + _dumps(calls[0]["arguments"]) + "}"


def hermes_system(system: str | None, tools: list[dict]) -> str:
    """The system turn's content with the tool schemas (Hermes / Qwen2.5 format)."""
    head = system + "\n\n" if system else ""
    return head + HERMES_TOOLS_HEAD + "".join("\n" + _dumps(t) for t in tools) + HERMES_TOOLS_TAIL


def hermes_call(content: str) -> str:
    """A function_call turn in the Hermes / Qwen2.5 format: one <tool_call> block per call."""
    return "\n".join('<tool_call>\n{"name": "' + c["name"] + '", "arguments": ' + _dumps(c["arguments"])
                     + "}\n</tool_call>" for c in parse_calls(content))


def hermes_observation(content: str) -> str:
    """A tool result in the Hermes / Qwen2.5 format (inside a user turn)."""
    return "<tool_response>\n" + content + "\n</tool_response>"
