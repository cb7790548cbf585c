"""Which files to read and how: `--input` paths and LLaMA-Factory `dataset_info.json` entries become DatasetSpecs.

A registry entry is honoured as LLaMA-Factory (v0.9.5) documents it in data/README.md: `file_name` (a file or a
folder of files, relative to the dataset directory), `formatting` (alpaca by default, sharegpt, openai), `columns`
and `tags`. Its defaults apply: an alpaca entry reads no system/history column unless `columns` names one. An alpaca
entry whose only column is `prompt` (LLaMA-Factory's pre-training description, e.g. c4_demo) reads Documents when
its records have no response (`output`) column. An `openai` entry defaults to OpenAI names (messages, role/content,
user/assistant/system/tool) where LLaMA-Factory would look for sharegpt's and fail. `num_samples` keeps the first N
valid records (LLaMA-Factory draws N at random).
Hub-hosted entries, preference (`ranking`), KTO and multimodal entries are refused: megapack does text SFT offline.
"""
from __future__ import annotations

import difflib
from contextlib import closing
import json
import os
from dataclasses import dataclass, field

from megapack.data.sources.readers import iter_records, list_data_files
from megapack.errors import MegapackError, nested_too_deeply

REGISTRY_FILE = "dataset_info.json"
DEFAULT_DATASET_DIR = "data"  # LLaMA-Factory's default dataset_dir
FORMATS = ("auto", "alpaca", "sharegpt", "openai", "text")
_REGISTRY_FORMATS = ("alpaca", "sharegpt", "openai", "text")
COLUMN_KEYS = ("prompt", "query", "response", "history", "messages", "system", "tools",
               "images", "videos", "audios", "chosen", "rejected", "kto_tag")
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
_MEDIA_COLUMNS = ("images", "videos", "audios")


@dataclass
class DatasetSpec:
    """One dataset to read: its files, record format and column/tag names (overrides of the format's defaults)."""

    name: str
    path: str
    formatting: str = "auto"
    columns: dict[str, str | None] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    num_samples: int | None = None  # registry `num_samples` (LLaMA-Factory's key): at most this many valid records
    registry: str | None = None  # the dataset_info.json this entry came from

    def __post_init__(self) -> None:
        if not self.files:
            self.files = list_data_files(self.path)


def load_registry(dataset_dir: str) -> dict[str, dict]:
    """The entries of `dataset_dir`/dataset_info.json, by dataset name."""
    path = os.path.join(dataset_dir, REGISTRY_FILE)
    try:
        with open(path, encoding="utf-8") as fp:
            info = json.load(fp)
    except FileNotFoundError:
        raise MegapackError(
            f"{path}: no such file (expected LLaMA-Factory's dataset registry in the dataset directory)"
        ) from None
    except json.JSONDecodeError as exc:
        raise MegapackError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MegapackError(f"{path}: unreadable ({exc})") from None
    except RecursionError:
        raise nested_too_deeply(path) from None
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise MegapackError(f"{path}: expected a JSON object mapping dataset names to entries")
    return info


def resolve_datasets(
    inputs: list[str] | None,
    names: list[str] | None,
    dataset_dir: str | None,
    fmt: str = "auto",
) -> list[DatasetSpec]:
    """DatasetSpecs for `--input` files/folders (read as `fmt`) and registry `names` (comma lists allowed)."""
    if fmt not in FORMATS:
        raise MegapackError(f"format {fmt!r} is not supported; expected one of {', '.join(FORMATS)}")
    specs = [DatasetSpec(name=os.path.basename(os.path.normpath(p)), path=p, formatting=fmt) for p in inputs or []]
    wanted = [n.strip() for item in names or [] for n in item.split(",") if n.strip()]
    if wanted:
        directory = dataset_dir if dataset_dir is not None else DEFAULT_DATASET_DIR
        registry = load_registry(directory)
        specs += [spec_from_entry(n, registry, directory) for n in wanted]
    if not specs:
        raise MegapackError("no dataset given; expected --input FILE or --dataset NAME (with --dataset-dir DIR)")
    return specs


def spec_from_entry(name: str, registry: dict[str, dict], dataset_dir: str) -> DatasetSpec:
    """The DatasetSpec of registry entry `name`, with LLaMA-Factory's defaults and refusals applied."""
    where = os.path.join(dataset_dir, REGISTRY_FILE)
    if name not in registry:
        close = difflib.get_close_matches(name, list(registry), n=3, cutoff=0.5)
        known = close or sorted(registry)[:5]
        more = "" if close or len(registry) <= 5 else f" and {len(registry) - 5} more"
        label = "did you mean" if close else "known"
        raise MegapackError(f"dataset {name!r} is not in {where} ({label}: {', '.join(known)}{more})")
    entry = registry[name]
    hub = [k for k in _HUB_KEYS if k in entry]
    if hub:
        # LLaMA-Factory prefers these over file_name; here nothing can be downloaded.
        raise MegapackError(
            f"{where}: dataset {name!r} is hosted remotely ({hub[0]}={entry[hub[0]]!r}); hub datasets are not "
            "available offline, expected an entry with a local file_name"
        )
    if not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
        raise MegapackError(f"{where}: dataset {name!r} has no file_name; expected a local file or folder name")
    if entry.get("ranking"):
        raise MegapackError(
            f"{where}: dataset {name!r} is a preference dataset (ranking: true); megapack does SFT only"
        )
    columns = entry.get("columns", {})
    tags = entry.get("tags", {})
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        raise MegapackError(f"{where}: dataset {name!r}: columns and tags must be JSON objects")
    odd = [f"{k}={v!r}" for k, v in [*columns.items(), *tags.items()] if v is not None and not isinstance(v, str)]
    if odd:
        raise MegapackError(f"{where}: dataset {name!r}: {odd[0]}; expected a column or tag name (a string)")
    if columns.get("kto_tag"):
        raise MegapackError(f"{where}: dataset {name!r} is a KTO dataset (columns.kto_tag); megapack does SFT only")
    media = [c for c in _MEDIA_COLUMNS if columns.get(c)]
    if media:
        raise MegapackError(
            f"{where}: dataset {name!r} is multimodal (columns.{media[0]}); megapack trains text-only models"
        )
    path = os.path.join(dataset_dir, entry["file_name"])
    if not os.path.exists(path):
        raise MegapackError(f"{where}: dataset {name!r}: file_name {path} does not exist; expected a file or folder")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in _REGISTRY_FORMATS:
        raise MegapackError(
            f"{where}: dataset {name!r} has formatting {formatting!r}; expected one of {', '.join(_REGISTRY_FORMATS)}"
        )
    resolved: dict[str, str | None] = {k: columns[k] for k in COLUMN_KEYS if k in columns}
    if formatting == "alpaca" and set(columns) == {"prompt"} and _lacks_response(path, "output"):
        # LLaMA-Factory's pre-training description, {"columns": {"prompt": "text"}}: LLaMA-Factory picks pre-training
        # by its stage; here records without the (default) response column make it a text dataset
        formatting = "text"
    if formatting == "text":
        resolved = {"text": columns.get("prompt", "text")}
    else:
        for optional in ("system", "tools", "history"):  # LLaMA-Factory reads these only when named
            resolved.setdefault(optional, None)
    num_samples = entry.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise MegapackError(f"{where}: dataset {name!r} has num_samples {num_samples!r}; expected a positive integer")
    return DatasetSpec(
        name=name,
        path=path,
        formatting=formatting,
        columns=resolved,
        tags={k: tags[k] for k in TAG_KEYS if k in tags},
        num_samples=num_samples,
        registry=where,
    )


def _lacks_response(path: str, response: str, look: int = 100) -> bool:
    """Whether the first record object among the first `look` records of `path` has no `response` key."""
    for file in list_data_files(path):
        with closing(iter_records(file)) as records:
            for n, item in enumerate(records):
                if n >= look:
                    return True
                if isinstance(item, tuple) and isinstance(item[1], dict):
                    return response not in item[1]
    return True
