"""Dataset preparation: ImageFolder -> TFRecord / webdataset / FFCV beton shards, a manifest, and checks.

``prepare_dataset`` writes ``OUT/<split>/`` (shards, DALI index files, ``manifest.json``);
``read_manifest`` loads a split's manifest; ``inspect_dataset`` validates a prepared split.
"""

from .core import DEFAULT_SHARD_SIZE, prepare_dataset
from .inspect import InspectReport, inspect_dataset
from pipelines.formats.manifest import FORMATS, MANIFEST_NAME, read_manifest, shard_paths

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "FORMATS",
    "MANIFEST_NAME",
    "InspectReport",
    "inspect_dataset",
    "prepare_dataset",
    "read_manifest",
    "shard_paths",
]
