"""The tokenizer half of a Hugging Face export: tokenizer files, tokenizer_config.json with the special tokens and the
chat template the run trained with, special_tokens_map.json and generation_config.json (EOS and end-of-turn ids).

`prepare_tokenizer` decides everything and refuses in one line before any weight is written; `write_tokenizer`
only writes. A LLaMA-3 tiktoken ranks file becomes a `tokenizer.json` (`tiktoken_json`) and is kept as
`original/tokenizer.model`; a `tokenizer.json` is copied; a SentencePiece model is copied as `tokenizer.model`.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from megapack.errors import MegapackError

HINT = "give --tokenizer-dir DIR (the tokenizer files to carry) or --no-tokenizer (weights and config.json only)"
_FILES = ("tokenizer.json", "original/tokenizer.model", "tokenizer.model")
_DROPPED = ("chat_template", "added_tokens_decoder", "tokenizer_file", "name_or_path")
_CARRIED = ("vocab.json", "merges.txt", "added_tokens.json")  # copied from the source folder when there


@dataclass(frozen=True)
class TokenizerExport:
    """What an export writes beside the weights: the tokenizer file, the folder it came from, the chat template."""

    file: Path  # tokenizer.json, a tiktoken ranks file or a SentencePiece model
    kind: str  # megapack's tokenizer kind: tokenizer-json, tiktoken-llama3, sentencepiece
    folder: Path | None  # an HF folder whose tokenizer_config.json / generation_config.json are kept
    chat_template: str | list[dict] | None  # jinja text, or transformers' list of named templates
    specials: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, pad_token (, unk_token)
    eos_ids: tuple[int, ...] = ()  # EOS and the template's end-of-turn id
    bos_id: int | None = None


def tokenizer_file(source: Path) -> Path | None:
    """The tokenizer file at `source`: itself, or in a folder tokenizer.json, original/tokenizer.model, tokenizer.model."""
    if source.is_file():
        return source
    return next((source / rel for rel in _FILES if (source / rel).is_file()), None)


def _template(record: dict | None, folder: Path | None, tokenizer, what: str, hint: str) -> tuple:
    """(chat_template, end-of-turn id or None) of the trained template record; refused in one line when unknown."""
    from megapack.data.render.hf_jinja import find_template_dir, parse_date, read_template_files
    from megapack.data.render.hf_template import HFChatTemplate
    from megapack.data.render.template_jinja import builtin_chat_template
    from megapack.data.render.templates import TEMPLATES, TemplateOptions

    options = (record or {}).get("options") or {}
    name = (record or {}).get("name")
    if name in TEMPLATES:
        end = TEMPLATES[name].end_of_turn.name
        eot = {"eos": tokenizer.eos_id, "bos": tokenizer.bos_id}.get(end, tokenizer.special_tokens.get(end))
        return builtin_chat_template(name, options.get("default_system")), eot
    if name == "hf":
        for place in (record.get("chat_template_from"), folder):
            try:
                found = HFChatTemplate.from_dir(place, parse_date(record.get("date"))) if place else None
            except MegapackError:
                continue
            if found is not None and found.identity(TemplateOptions(**options)) == record.get("identity"):
                sources = found.sources
                return (sources["default"] if list(sources) == ["default"] else
                        [{"name": k, "template": v} for k, v in sources.items()]), None
        raise MegapackError(f"{what}: the run's chat template (hf, from {record.get('chat_template_from')}) is not "
                            f"found unchanged there or in {folder}; {hint}")
    if name is not None:
        raise MegapackError(f"{what}: the run trained with chat template {name!r}, which has no jinja form; {hint}")
    try:  # no record (older checkpoints): the tokenizer folder's own template, if any
        sources, _ = read_template_files(find_template_dir(folder)) if folder else ({}, {})
    except MegapackError:
        sources = {}
    if not sources:  # nothing trained a template (an hf-to-megatron round trip of a base model): none to write
        return None, None
    return (sources["default"] if list(sources) == ["default"] else
            [{"name": k, "template": v} for k, v in sources.items()]), None


def prepare_tokenizer(source: str | Path, template: dict | None, what: str, hint: str = HINT) -> TokenizerExport:
    """The export of the tokenizer at `source` (an HF folder or a tokenizer file) with the trained chat template
    record (`template` of the shards' meta.json); refused in one line when something is missing."""
    from megapack.data.render.tokenizers import load_tokenizer

    source = Path(source)
    file = tokenizer_file(source) if source.exists() else None
    if file is None:
        raise MegapackError(f"{what}: {source} holds no tokenizer file (tokenizer.json, tokenizer.model or "
                            f"original/tokenizer.model); {hint}")
    tokenizer = load_tokenizer(file)
    folder = source if source.is_dir() else None
    chat_template, eot = _template(template, folder, tokenizer, what, hint)
    config = _json(folder / "tokenizer_config.json") if folder else {}
    names = {i: n for n, i in tokenizer.special_tokens.items()}
    specials = {"bos_token": names.get(tokenizer.bos_id), "eos_token": names.get(tokenizer.eos_id),
                "pad_token": names.get(tokenizer.pad_id)}
    if tokenizer.kind == "sentencepiece":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_proto=file.read_bytes())
        specials = {"bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(sp.eos_id()),
                    "unk_token": sp.id_to_piece(sp.unk_id())}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):  # the folder's own choice wins
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            specials[key] = value
    eos = [tokenizer.eos_id] + ([eot] if eot is not None else [])
    return TokenizerExport(file, tokenizer.kind, folder, chat_template,
                           {k: v for k, v in specials.items() if v is not None}, tuple(dict.fromkeys(eos)),
                           tokenizer.bos_id)


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _dump(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer(export: TokenizerExport, out_dir: str | Path) -> list[str]:
    """Write the tokenizer files into out_dir; returns their names (relative), in the order written."""
    from megapack.data.render.tiktoken_json import llama3_tokenizer_json
    from megapack.data.render.tokenizers import load_tokenizer

    out, written = Path(out_dir), []
    if export.kind == "tiktoken-llama3":
        specials = load_tokenizer(export.file).special_tokens
        (out / "tokenizer.json").write_text(llama3_tokenizer_json(export.file, specials), encoding="utf-8")
        (out / "original").mkdir(exist_ok=True)
        shutil.copyfile(export.file, out / "original" / "tokenizer.model")
        written += ["tokenizer.json", "original/tokenizer.model"]
    else:
        name = "tokenizer.json" if export.kind == "tokenizer-json" else "tokenizer.model"
        shutil.copyfile(export.file, out / name)
        written.append(name)
        if export.folder is not None and (export.folder / "original" / "tokenizer.model").is_file():
            (out / "original").mkdir(exist_ok=True)
            shutil.copyfile(export.folder / "original" / "tokenizer.model", out / "original" / "tokenizer.model")
            written.append("original/tokenizer.model")
    for rel in _CARRIED:  # the folder's other tokenizer files travel unchanged (slow tokenizers' vocab and merges)
        if export.folder is not None and (export.folder / rel).is_file() and rel not in written:
            shutil.copyfile(export.folder / rel, out / rel)
            written.append(rel)
    config = {k: v for k, v in (_json(export.folder / "tokenizer_config.json") if export.folder else {}).items()
              if k not in _DROPPED}
    config.setdefault("tokenizer_class", "LlamaTokenizer" if export.kind == "sentencepiece"
                      else "PreTrainedTokenizerFast")
    config.update(export.specials)
    if export.chat_template is not None:
        config["chat_template"] = export.chat_template  # for transformers before 4.50, which reads only this
    if isinstance(export.chat_template, str):  # where transformers 5 saves and looks for it first
        (out / "chat_template.jinja").write_text(export.chat_template, encoding="utf-8")
        written.append("chat_template.jinja")
    _dump(out / "tokenizer_config.json", config)
    special_map = _json(export.folder / "special_tokens_map.json") if export.folder else {}
    _dump(out / "special_tokens_map.json", {**special_map, **export.specials})  # additional_special_tokens kept
    generation = _json(export.folder / "generation_config.json") if export.folder else {}
    old = generation.get("eos_token_id")
    old = old if isinstance(old, list) else [old] if isinstance(old, int) else []
    eos = list(dict.fromkeys([*old, *export.eos_ids]))
    generation.update({"bos_token_id": export.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos})
    _dump(out / "generation_config.json", generation)
    return written + ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]
