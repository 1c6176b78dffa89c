"""Images in: sources on disk or in memory (``sources``), tar shards (``shards``), the cached file
index of large folders (``file_index``), the decoding of one file (``images``), a whole source
decoded into memory (``decoding``) or at the training size into a cache file (``pixel_cache``) and
the batches of view pairs the training loop reads (``dataset``).

The names most callers need are importable from here: ``from ssl_pretrain.data import open_source``.
"""

from ssl_pretrain.data.decoding import DecodedSource, common_small_size, decode_all, decode_workers, decoded_in_memory
from ssl_pretrain.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    DataError,
    ImageSource,
    UnreadableImage,
    decode_image_bytes,
    load_image,
    to_rgb,
)
from ssl_pretrain.data.sources import (
    ArraySource,
    FileSource,
    ReducedLoader,
    SubsetSource,
    check_readable,
    check_same_classes,
    digits_source,
    image_folder_source,
    labelled_list_source,
    open_source,
    random_subset,
    read_labelled_list,
    read_path_list,
    scan_images,
)

__all__ = [
    "DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "ArraySource", "DataError", "DecodedSource", "FileSource",
    "ImageSource", "ReducedLoader", "SubsetSource", "UnreadableImage", "check_readable", "check_same_classes", "common_small_size", "decode_all",
    "decode_image_bytes", "decode_workers", "decoded_in_memory", "digits_source", "image_folder_source", "labelled_list_source",
    "load_image", "open_source", "random_subset", "read_labelled_list", "read_path_list", "scan_images", "to_rgb",
]
