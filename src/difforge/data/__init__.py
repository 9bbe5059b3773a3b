"""Data layer: image folders and built-in datasets as tensors in [-1, 1].

- `load_dataset(source, image_size=...)` -> `ImageDataset` (a folder or a built-in name);
- `list_image_files`, `decode_image`, `UnreadableImageError`: reading single files;
- `load_image_files`: pictures to restore, prepared as training images are;
- `load_builtin`, `BUILTIN_DATASETS`, `BuiltinArrays`: the packaged datasets.

See ``docs/data.md`` for the formats, the conversions and the built-ins' licences.
"""

from difforge.data.builtin import (
    BUILTIN_DATASETS,
    PIP_COMMAND,
    BuiltinArrays,
    builtin_attribution,
    builtin_available,
    load_builtin,
)
from difforge.data.dataset import CACHE_LIMIT_BYTES, ImageDataset, load_dataset, load_image_files
from difforge.data.io import (
    IMAGE_EXTENSIONS,
    UnreadableImageError,
    decode_image,
    list_image_files,
)

__all__ = [
    "BUILTIN_DATASETS",
    "CACHE_LIMIT_BYTES",
    "IMAGE_EXTENSIONS",
    "PIP_COMMAND",
    "BuiltinArrays",
    "ImageDataset",
    "UnreadableImageError",
    "builtin_attribution",
    "builtin_available",
    "decode_image",
    "list_image_files",
    "load_builtin",
    "load_dataset",
    "load_image_files",
]
