"""The manifest of a prepared split: :mod:`pipelines.formats.manifest` (re-exported here for ``prepare``)."""

from pipelines.atomic import fsync_dir
from pipelines.formats.manifest import (
    FORMATS,
    INDEX_EXT,
    LAYOUT,
    MANIFEST_NAME,
    REQUIRED_KEYS,
    SCHEMA_VERSION,
    SHARD_EXT,
    SHARD_KEYS,
    index_name,
    is_prepared_manifest,
    manifest_path,
    read_manifest,
    sha256_file,
    shard_name,
    shard_paths,
    validate_manifest,
    write_json_atomic,
)

__all__ = ["FORMATS", "INDEX_EXT", "LAYOUT", "MANIFEST_NAME", "REQUIRED_KEYS", "SCHEMA_VERSION", "SHARD_EXT",
           "SHARD_KEYS", "fsync_dir", "index_name", "is_prepared_manifest", "manifest_path", "read_manifest",
           "sha256_file", "shard_name", "shard_paths", "validate_manifest", "write_json_atomic"]
