"""Byte-level encoders of the shard formats: :mod:`pipelines.formats.tfrecord` and
:mod:`pipelines.formats.wds` (re-exported here for ``prepare``; the formats have one implementation)."""

from pipelines.formats.tfrecord import (
    _crc32c_fallback,
    _crc32c_python,
    crc32c,
    decode_example,
    encode_example,
    iter_tfrecord_offsets,
    masked_crc32c,
    read_tfrecord_payload,
    tfrecord_frame,
)
from pipelines.formats.wds import TAR_BLOCK, TAR_RECORD, tar_end, tar_header, tar_padding

__all__ = ["TAR_BLOCK", "TAR_RECORD", "_crc32c_fallback", "_crc32c_python", "crc32c", "decode_example",
           "encode_example", "iter_tfrecord_offsets", "masked_crc32c", "read_tfrecord_payload", "tar_end",
           "tar_header", "tar_padding", "tfrecord_frame"]
