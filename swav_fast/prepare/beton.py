"""FFCV ``.beton`` writing and table reading: :mod:`pipelines.formats.beton` (re-exported for ``prepare``)."""

from pipelines.formats.beton import (
    ALLOC,
    BETON_VERSION,
    DEFAULT_PAGE_SIZE,
    FIELD_DESC,
    FIELDS,
    HEADER,
    IMAGE_META,
    JPEG_MODE,
    MAX_PAGE_SIZE,
    MIN_PAGE_SIZE,
    SAMPLE_META,
    TYPE_INT,
    TYPE_RGB_IMAGE,
    BetonWriter,
    check_page_size,
    data_start,
    join_rows,
    metadata_start,
    read_beton_tables,
)

__all__ = ["ALLOC", "BETON_VERSION", "DEFAULT_PAGE_SIZE", "FIELDS", "FIELD_DESC", "HEADER", "IMAGE_META",
           "JPEG_MODE", "MAX_PAGE_SIZE", "MIN_PAGE_SIZE", "SAMPLE_META", "TYPE_INT", "TYPE_RGB_IMAGE",
           "BetonWriter", "check_page_size", "data_start", "join_rows", "metadata_start", "read_beton_tables"]
