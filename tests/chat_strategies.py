"""Hypothesis strategies shared by the template tests: conversations with tool calls and observations."""
from __future__ import annotations

import json

from hypothesis import strategies as st

from megapack.data.sources.conversation import Conversation, Message


@st.composite
def tool_chats(draw, text, tools, names=("f", "weather")):
    """1-3 user/assistant rounds, each maybe with a function call (JSON with one argument) and its observation."""
    messages = []
    for _ in range(draw(st.integers(1, 3))):
        messages.append(Message("user", draw(text)))
        if draw(st.booleans()):
            call = {"name": draw(st.sampled_from(names)), "arguments": {"x": draw(text)}}
            messages += [Message("function_call", json.dumps(call)), Message("observation", draw(text))]
        messages.append(Message("assistant", draw(text)))
    return Conversation(messages, system=draw(st.none() | text), tools=draw(tools))
