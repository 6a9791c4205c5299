"""WebDataset shard I/O, converters, the embedded default dataset, view pipelines and the DataModules."""

from .datamodule import CLIPDataModule, ShardDataModule, SimCLRDataModule
from .shards import ShardIndex, ShardSink, ShardSpecError, resolve_shards
from .views import SimCLRAugmentation

__all__ = [
    "CLIPDataModule",
    "ShardDataModule",
    "ShardIndex",
    "ShardSink",
    "ShardSpecError",
    "SimCLRAugmentation",
    "SimCLRDataModule",
    "resolve_shards",
]
