"""Scripts and tooling beside the runtime package: they may import megapack (any layer); megapack never imports them.

A package (not a namespace) so that `python -m tools.gpu.check` from the repository root resolves to this folder
even when some installed distribution ships a top-level `tools` of its own.
"""
