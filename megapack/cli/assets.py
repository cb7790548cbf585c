"""`megapack assets [list]` / `megapack assets fetch NAME...`: the pinned reference files and models in the cache."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the assets flags."""
    parser.add_argument("action", choices=("list", "fetch"), nargs="?", default="list",
                        help="list: every asset and where it is cached; fetch: download (and convert) the NAMEs")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="assets to fetch, e.g. smollm2-135m-instruct (the real model as an HF folder)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="the asset cache (default: $MEGAPACK_CACHE_DIR, else ~/.cache/megapack)")


def run(args: argparse.Namespace) -> int:
    """List the assets, or fetch the named ones and print each one's path."""
    from pathlib import Path

    from megapack.assets import ASSETS, cache_root, fetch
    from megapack.errors import MegapackError
    from megapack.model.gguf_import import HF_MODELS, fetch_hf_model

    cache = Path(args.cache_dir) if args.cache_dir else None
    names = sorted([*ASSETS, *HF_MODELS])
    if args.action == "list":
        for name in names:
            where = cache_root(cache) / name
            print(f"{name:30s} {'cached' if where.exists() else 'not fetched':12s} "
                  f"{HF_MODELS[name].gguf_asset + ' as an HF folder' if name in HF_MODELS else ASSETS[name].dist}")
        return 0
    if not args.names:
        raise MegapackError(f"megapack assets fetch: name at least one asset of: {', '.join(names)}")
    for name in args.names:
        if name not in names:
            raise MegapackError(f"megapack assets fetch: unknown asset {name!r}; expected one of: {', '.join(names)}")
        path = fetch_hf_model(name, cache) if name in HF_MODELS else fetch(name, cache)
        print(f"{name}: {path}")
    return 0
