"""Built-in chat templates written as Hugging Face jinja `chat_template`s, for exports (`tokenizer_config.json`).

Each renders what megapack's `ChatTemplate` renders for a conversation of system (first), user, assistant and tool
(an observation) messages: `apply_chat_template(messages, add_generation_prompt=True)` gives the text of
`prompt_ids`, and without it a conversation ending on an assistant turn gives the text of `encode`. Differences
kept: the response header follows a user or tool turn only when a turn follows or `add_generation_prompt` is set
(megapack always writes it); a `tools` list and assistant `tool_calls` raise (megapack's tool formats are not
written as jinja); text between special tokens is one string here, where megapack encodes a response's content
apart from the text around it (see `templates`), which changes ids only where a content starts with a line break
or the BPE merges across that edge.
"""
from __future__ import annotations

import json

from megapack.data.render.templates import TEMPLATES
from megapack.errors import MegapackError

_HEAD = (
    "{%- if tools %}{{ raise_exception('this chat template (megapack " + "{name}" + ") renders no tools') }}{% endif %}\n"
    "{%- set default_system = {system} %}\n"
    "{%- if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = default_system %}{% set turns = messages %}{% endif %}\n"
    "{%- for m in turns %}{% if m['role'] not in ['user', 'assistant', 'tool'] or m.get('tool_calls') %}"
    "{{ raise_exception('megapack " + "{name}" + ": a turn must be user, assistant (no tool_calls) or tool') }}"
    "{% endif %}{% endfor %}\n"
)

_BODIES = {
    "llama3": (
        "{{- bos_token }}\n"
        "{%- if system %}{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}{% endif %}\n"
        "{%- for m in turns %}\n"
        "{%- if m['role'] == 'assistant' %}{{ m['content'] + '<|eot_id|>' }}\n"
        "{%- else %}{{ '<|start_header_id|>' + ('ipython' if m['role'] == 'tool' else 'user')"
        " + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}\n"
        "{%- if not loop.last or add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}{% endif %}\n"
        "{%- endfor %}\n"
    ),
    "chatml": (
        "{{- bos_token }}\n"
        "{%- if system %}{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}{% endif %}\n"
        "{%- for m in turns %}\n"
        "{%- if m['role'] == 'assistant' %}{{ m['content'] + '<|im_end|>\\n' }}\n"
        "{%- else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}\n"
        "{%- if not loop.last or add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}{% endif %}\n"
        "{%- endfor %}\n"
    ),
    "llama2": (
        "{%- for m in turns %}\n"
        "{%- if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}\n"
        "{%- else %}{% set content = m['content'] %}"
        "{%- if loop.first and system and m['role'] == 'user' %}"
        "{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}{% endif %}"
        "{{ bos_token + '[INST] ' + content + ' [/INST]' }}{% endif %}\n"
        "{%- endfor %}\n"
    ),
    "plain": (
        "{%- set texts = ([system] if system else []) + turns | map(attribute='content') | list %}"
        "{{- bos_token + texts | join('\\n\\n') }}{% if not add_generation_prompt %}{{ eos_token }}{% endif %}\n"
    ),
}


def builtin_chat_template(name: str, default_system: str | None = None) -> str:
    """The jinja `chat_template` of built-in template `name` with the run's default system prompt."""
    if name not in _BODIES or name not in TEMPLATES:
        raise MegapackError(f"chat template {name!r} has no jinja form; expected one of {', '.join(_BODIES)}")
    system = json.dumps(default_system, ensure_ascii=False) if default_system else "none"
    return _HEAD.replace("{name}", name).replace("{system}", system) + _BODIES[name]
