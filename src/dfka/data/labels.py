"""Readable label names and the label-subset syntax (``digit_0..digit_4,digit_7``).

Names are unique across datasets, so a teacher's label set (and the union of several teachers' sets)
can be written down without saying which dataset each label came from.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from dfka.errors import ConfigError, LabelError

MNIST_LABELS: tuple[str, ...] = tuple(f"digit_{i}" for i in range(10))
FASHION_LABELS: tuple[str, ...] = (
    "t_shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
#: The 20-class union, digits first: the label order of ``mnist+fashion`` and of ``mosaic`` targets.
ALL_LABELS: tuple[str, ...] = MNIST_LABELS + FASHION_LABELS
LABEL_INDEX: dict[str, int] = {name: i for i, name in enumerate(ALL_LABELS)}

#: Dataset name -> its ordered labels.
DATASET_LABELS: dict[str, tuple[str, ...]] = {
    "mnist": MNIST_LABELS,
    "fashion": FASHION_LABELS,
    "mnist+fashion": ALL_LABELS,
    "mosaic": ALL_LABELS,
}
DATASETS: tuple[str, ...] = tuple(DATASET_LABELS)
RANGE_SEP = ".."


def check_dataset(dataset: str) -> str:
    """Return ``dataset`` if known, else raise a ConfigError that suggests the closest name."""
    if dataset in DATASET_LABELS:
        return dataset
    close = difflib.get_close_matches(str(dataset), DATASETS, n=2, cutoff=0.4)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ConfigError(f"unknown dataset {dataset!r}", f"{hint}valid datasets: {', '.join(DATASETS)}")


def label_names(dataset: str) -> list[str]:
    """All label names of ``dataset``, in class-index order."""
    return list(DATASET_LABELS[check_dataset(dataset)])


def source_of(label: str) -> str:
    """The single-label dataset (``mnist`` or ``fashion``) a label name belongs to."""
    return "mnist" if label in MNIST_LABELS else "fashion"


def _unknown(name: str, valid: Sequence[str], dataset: str | None) -> LabelError:
    where = f"dataset {dataset!r}" if dataset else "any dataset"
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    if not close:  # names from the other dataset are a common slip: mention them too
        close = difflib.get_close_matches(name, ALL_LABELS, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return LabelError(f"unknown label {name!r} for {where}", f"{hint}valid labels: {', '.join(valid)}")


def parse_labels(spec: str | Sequence[str], dataset: str | None = None) -> list[str]:
    """Parse a label subset: comma-separated names and inclusive name ranges, in the user's order.

    ``"digit_0..digit_4,digit_7"`` -> digits 0-4 then 7; ``"t_shirt..coat"`` -> the first five garments.
    A range runs over one dataset's ordered list (MNIST or Fashion), never across the two.
    ``spec`` may also be a list of such items. Names are case-insensitive. With ``dataset`` given,
    only that dataset's labels are accepted.
    """
    valid = label_names(dataset) if dataset is not None else list(ALL_LABELS)
    items = [spec] if isinstance(spec, str) else list(spec)
    tokens: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise LabelError(
                f"label entries must be strings, got {item!r}", "write labels as names, e.g. digit_3"
            )
        tokens.extend(t.strip() for t in item.split(","))
    tokens = [t for t in tokens if t]

    out: list[str] = []
    for token in tokens:
        if RANGE_SEP in token:
            out.extend(_expand_range(token, valid, dataset))
        else:
            out.append(_resolve(token, valid, dataset))
    if not out:
        raise LabelError(
            "the label set is empty", f"name at least one label, e.g. {valid[0]} or {valid[0]}..{valid[4]}"
        )
    dupes = [name for name in dict.fromkeys(out) if out.count(name) > 1]
    if dupes:
        raise LabelError(
            f"duplicate labels in {','.join(tokens)!r}: {', '.join(dupes)}",
            "list each label once (check overlapping ranges)",
        )
    return out


def _resolve(name: str, valid: Sequence[str], dataset: str | None) -> str:
    key = name.strip().lower()
    if key in valid:
        return key
    raise _unknown(name, valid, dataset)


def _expand_range(token: str, valid: Sequence[str], dataset: str | None) -> list[str]:
    first, _, last = token.partition(RANGE_SEP)
    if not first.strip() or not last.strip() or RANGE_SEP in last:
        raise LabelError(
            f"malformed label range {token!r}", "write a range as FIRST..LAST, e.g. digit_0..digit_4"
        )
    lo, hi = _resolve(first, valid, dataset), _resolve(last, valid, dataset)
    if source_of(lo) != source_of(hi):
        raise LabelError(
            f"label range {token!r} spans two datasets ({source_of(lo)} and {source_of(hi)})",
            "a range must stay within one dataset; write two ranges, e.g. digit_0..digit_9,t_shirt..ankle_boot",
        )
    order = MNIST_LABELS if source_of(lo) == "mnist" else FASHION_LABELS
    i, j = order.index(lo), order.index(hi)
    if i > j:
        raise LabelError(
            f"label range {token!r} is reversed ({lo} comes after {hi})", f"write it as {hi}..{lo}"
        )
    return list(order[i : j + 1])
