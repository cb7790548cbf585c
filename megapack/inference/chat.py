"""A loaded model that answers chats: megatron GPTModel at TP1/PP1 in this process (gloo on the CPU, or one GPU),
the tokenizer, the chat template with its generation prompt, and the stop ids of the template's end of turn."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megapack.data.sources.conversation import ASSISTANT, OBSERVATION, USER, Conversation, Message
from megapack.errors import MegapackError
from megapack.inference.source import ModelSource, choose_template, resolve_model, stop_ids, tokenizer_path
from megapack.model.generate import Decoder, Generation, Sampling

ROLES = {"user": USER, "assistant": ASSISTANT, "tool": OBSERVATION, "ipython": OBSERVATION}
DTYPES = ("auto", "fp32", "bf16")


@dataclass
class Reply:
    """One answer: its token ids (the stop token last, when it stopped on one), its text, and the generation."""

    tokens: list[int]
    text: str
    generation: Generation


def read_messages(path: str | Path) -> list[dict]:
    """OpenAI-style messages from a JSON file: a list of {role, content}, or an object with a `messages` list."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MegapackError(f"--messages {path}: unreadable ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:
        raise MegapackError(f"--messages {path}: not valid JSON ({type(exc).__name__})") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise MegapackError(f"--messages {path}: expected a JSON list of {{\"role\", \"content\"}} objects "
                            f"(or an object with a \"messages\" list)")
    return messages


def to_conversation(messages: list[dict], where: str = "messages") -> Conversation:
    """A Conversation from OpenAI-style messages (an optional first system message); the last must be a prompt."""
    system, turns = None, []
    for k, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if not isinstance(content, str):
            raise MegapackError(f"{where}: message {k} has no text content (expected a string \"content\")")
        if role == "system" and k == 0:
            system = content
        elif role in ROLES:
            turns.append(Message(ROLES[role], content))
        else:
            raise MegapackError(f"{where}: message {k} has role {role!r}; expected system (first), user, assistant "
                                f"or tool")
    if not turns or turns[-1].role not in (USER, OBSERVATION):
        raise MegapackError(f"{where}: the last message must be from the user (or a tool), for the model to answer")
    return Conversation(messages=turns, system=system, source=where)


class ChatModel:
    """A model ready to answer: `reply(messages)` renders the chat, generates and decodes the answer."""

    def __init__(self, checkpoint: str | Path, *, template: str | None = None, tokenizer_model: str | None = None,
                 template_date: str | None = None, dtype: str = "auto", use_cache: bool = True) -> None:
        from megapack.data.render.tokenizers import load_tokenizer

        self.source: ModelSource = resolve_model(checkpoint)
        self.tokenizer = load_tokenizer(tokenizer_path(self.source, tokenizer_model))
        self.template_name, self.trained, self.template_why = choose_template(self.source, template)
        self.template = self._load_template(template_date)
        vocab = int(self.source.hf_config["vocab_size"])
        self.end_of_turn = self._end_of_turn_id()
        special = getattr(self.template, "end_of_turn", None)  # a marker the vocabulary lacks is written as text
        self.stop_text = special.name if special is not None and self.end_of_turn is None else None
        self.stop_ids = stop_ids(self.source.hf_config,
                                 [t for t in (self.end_of_turn, self.tokenizer.eos_id) if t is not None], vocab)
        if dtype not in DTYPES:
            raise MegapackError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        self.model = self._load_model(dtype)
        limit = int(self.source.hf_config.get("max_position_embeddings") or 8192)
        self.decoder = Decoder(self.model, limit, use_cache=use_cache)

    def _load_template(self, template_date: str | None):
        from megapack.data.render.templates import get_template

        if self.template_name != "hf":
            return get_template(self.template_name)
        from megapack.data.render.hf_jinja import parse_date
        from megapack.data.render.hf_template import HFChatTemplate

        recorded = self.trained if self.trained and self.trained.get("name") == "hf" else {}
        origin = recorded.get("chat_template_from")
        folder = Path(origin) if origin and Path(origin).exists() else self.tokenizer.path
        return HFChatTemplate.from_dir(folder, parse_date(template_date or recorded.get("date")))

    def _end_of_turn_id(self) -> int | None:
        """The built-in template's end-of-turn token id (None for text markers and `hf`, which stop on EOS ids)."""
        special = getattr(self.template, "end_of_turn", None)
        if special is None:
            return None
        if special.name == "eos":
            return self.tokenizer.eos_id
        return self.tokenizer.special_tokens.get(special.name)

    def _load_model(self, dtype: str):
        from megapack.model.builder import build_model
        from megapack.model.checkpoint import load_model_checkpoint
        from megapack.model.hf_import import load_hf_weights
        from megapack.training.run.distributed import init_distributed

        hf_config = self.source.hf_config
        stored_bf16 = (hf_config.get("torch_dtype") or hf_config.get("dtype")) == "bfloat16"
        init_distributed(tp=1, pp=1)
        model = build_model(hf_config, attention_backend="sdpa", perform_initialization=False,
                            bf16=stored_bf16).eval()
        if self.source.kind == "hf":
            load_hf_weights(model, self.source.path)
        else:
            load_model_checkpoint(model, self.source.path)
        want = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(dtype)
        if want is None:  # auto: fp32 on the CPU, the stored precision on a GPU
            want = torch.bfloat16 if stored_bf16 and torch.cuda.is_available() else torch.float32
        return model.to(want)

    def describe(self) -> str:
        """Which checkpoint, tokenizer and template this is (one line)."""
        why = self.template_why
        if why == "--template" and self.trained and self.trained.get("name") != self.template_name:
            why += f"; the run trained with {self.trained.get('name')}"
        return (f"{self.source.describe()}; tokenizer {self.tokenizer.path}; template {self.template_name} "
                f"({why}); device {next(self.model.parameters()).device}")

    def prompt_ids(self, messages: list[dict], system: str | None = None) -> list[int]:
        """The chat rendered with the template's generation prompt (`system` when it has no system message)."""
        from megapack.data.render.templates import TemplateOptions
        from megapack.data.render.tool_calls import UnrenderableRecord

        conversation = to_conversation(messages)
        options = TemplateOptions(default_system=system)
        try:
            return self.template.prompt_ids(conversation, self.tokenizer, options)
        except UnrenderableRecord as exc:
            raise MegapackError(f"template {self.template_name}: cannot render the messages ({exc})") from None

    def reply(self, messages: list[dict], *, max_new_tokens: int = 256, sampling: Sampling = Sampling(),
              system: str | None = None) -> Reply:
        """Generate the assistant's answer to `messages`; the text leaves out the stop token."""
        ids = self.prompt_ids(messages, system)
        marker = self.stop_text
        seen = (lambda tokens: marker in self.tokenizer.decode(tokens[-8:])) if marker else None
        generation = self.decoder.generate(ids, max_new_tokens, self.stop_ids, sampling, on_token=seen)
        shown = generation.tokens[:-1] if generation.stopped == "stop_token" else generation.tokens
        text = self.tokenizer.decode(shown)
        if marker and marker in text:
            text = text[:text.index(marker)]
        return Reply(tokens=generation.tokens, text=text, generation=generation)

    def close(self) -> None:
        """Tear down the process group this model was built in."""
        from megapack.training.run.distributed import destroy_distributed

        destroy_distributed()
