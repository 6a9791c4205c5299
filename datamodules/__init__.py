"""WebDataset shard I/O, converters, the embedded default dataset, view pipelines and the DataModules."""

from .datamodule import ShardDataModule
from .modalities import CLIPDataModule, SimCLRDataModule
from .multimodal import CleanCLIPDataModule, TACleanerDataModule
from .shards import ShardIndex, ShardSink, ShardSpecError, resolve_shards
from .views import SimCLRAugmentation

__all__ = [
    "CLIPDataModule",
    "CleanCLIPDataModule",
    "ShardDataModule",
    "ShardIndex",
    "ShardSink",
    "ShardSpecError",
    "SimCLRAugmentation",
    "SimCLRDataModule",
    "TACleanerDataModule",
    "resolve_shards",
]
