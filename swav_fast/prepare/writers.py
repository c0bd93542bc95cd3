"""Shard writers: :mod:`pipelines.formats` (TFRecord + ``tfrecord2idx``, webdataset + ``wds2idx``),
re-exported here for ``prepare``."""

from pipelines.formats.shardfile import TMP_SUFFIX, ShardWriter
from pipelines.formats.tfrecord import TFRecordShardWriter
from pipelines.formats.wds import WDS_INDEX_VERSION, WdsShardWriter, key_digits

__all__ = ["TMP_SUFFIX", "WDS_INDEX_VERSION", "ShardWriter", "TFRecordShardWriter", "WdsShardWriter", "key_digits"]
