"""The data source a config names: one shard directory (data.path) or a mixture of several (data.blend)."""
from __future__ import annotations

from megapack.training.preflight.config import RunConfig
from megapack.training.preflight.plan import RunPlan
from megapack.training.run.blend import BlendSource
from megapack.training.run.source import DataSource, ShardSource, batch_feed


def open_source(config: RunConfig, plan: RunPlan, device, log) -> DataSource:
    """The data source the config names: a shard directory (data.path) or a mixture (data.blend)."""
    from megatron.core import parallel_state as ps

    feed, dp_rank = batch_feed(plan, config, device), ps.get_data_parallel_rank()
    if config.data.blend:
        return BlendSource(config, plan, feed, dp_rank, log)
    return ShardSource(config, plan, feed, dp_rank, log)
