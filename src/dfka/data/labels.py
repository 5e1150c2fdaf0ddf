"""Readable label names and the label-subset syntax (``digit_0..digit_4,digit_7``).

Names are unique across datasets, so a teacher's label set (and the union of several teachers' sets)
can be written down without saying which dataset each label came from.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence

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


def is_folder_dataset(dataset: str) -> bool:
    """A path or ``s3://`` prefix (a folder dataset, :mod:`dfka.data.folder`) rather than a built-in name."""
    from dfka.data.folder import is_folder_spec

    return isinstance(dataset, str) and dataset not in DATASET_LABELS and is_folder_spec(dataset)


def check_dataset(dataset: str) -> str:
    """Return ``dataset`` if known (or an existing folder dataset), else raise a ConfigError that suggests
    the closest name."""
    if dataset in DATASET_LABELS:
        return dataset
    if is_folder_dataset(dataset):
        from dfka.data.folder import dataset_labels

        dataset_labels(dataset)  # exists, has train/ and test/, safe label names
        return dataset
    close = difflib.get_close_matches(str(dataset), DATASETS, n=2, cutoff=0.4)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ConfigError(
        f"unknown dataset {dataset!r}",
        f"{hint}valid datasets: {', '.join(DATASETS)}, or a folder dataset (ROOT/train/LABEL/IMAGE.png, "
        "ROOT/test/...)",
    )


def label_names(dataset: str) -> list[str]:
    """All label names of ``dataset``, in class-index order."""
    if is_folder_dataset(dataset):
        from dfka.data.folder import dataset_labels

        return dataset_labels(dataset)
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
    if dataset is not None and is_folder_dataset(dataset):  # the folder's own names and order
        if isinstance(spec, str) and not spec.strip():
            raise LabelError("the label set is empty", f"name at least one label, e.g. {valid[0]}")
        return resolve_target_labels(spec, valid) or list(valid)
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
    return _once(out, lambda dupes: f"duplicate labels in {','.join(tokens)!r}: {dupes}", "")


def _once(out: list[str], problem: Callable[[str], str], also: str) -> list[str]:
    """``out`` if no label is in it twice, else one LabelError naming the duplicates."""
    dupes = [label for label in dict.fromkeys(out) if out.count(label) > 1]
    if dupes:
        raise LabelError(problem(", ".join(dupes)), f"list each label once (check overlapping ranges{also})")
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


def resolve_target_labels(spec: str | Sequence[str] | None, available: Sequence[str]) -> list[str] | None:
    """Y_cst from names and ranges, matched against the teachers' labels; ``None``/empty = the union.

    Plain names match the teachers' label names (case-insensitive); ``FIRST..LAST`` ranges expand over a
    dataset's label order (``digit_0..digit_4``, see :func:`parse_labels`), or over ``available``'s order.
    """
    if spec is None:
        return None
    items = [spec] if isinstance(spec, str) else list(spec)
    tokens = [t.strip() for item in items for t in item.split(",") if t.strip()]
    if not tokens:
        return None
    by_lower = {label.lower(): label for label in available}
    out: list[str] = []
    for token in tokens:
        if ".." in token:
            out.extend(_expand_teacher_range(token, available))
        elif token.lower() in by_lower:
            out.append(by_lower[token.lower()])
        else:
            close = difflib.get_close_matches(token.lower(), list(by_lower), n=1, cutoff=0.6)
            hint = f"did you mean {by_lower[close[0]]}? " if close else ""
            raise LabelError(
                f"target label {token!r} is not a label of any teacher",
                f"{hint}choose from the teachers' labels: {', '.join(available)}",
            )
    return _once(
        out,
        lambda dupes: f"target labels {', '.join(tokens)!r} name {dupes} more than once",
        " and differently-cased names",
    )


def _expand_teacher_range(token: str, available: Sequence[str]) -> list[str]:
    """A built-in range (``digit_0..digit_4``) over its dataset's order; a range between two of the
    teachers' own label names over the order the teachers list their labels in."""
    first, _, last = (part.strip().lower() for part in token.partition(".."))
    order = list(dict.fromkeys(available))
    lowered = [label.lower() for label in order]
    if first in ALL_LABELS and last in ALL_LABELS:
        return parse_labels(token)
    if first in lowered and last in lowered and ".." not in last:
        i, j = lowered.index(first), lowered.index(last)
        if i > j:
            raise LabelError(
                f"label range {token!r} is reversed ({order[i]} comes after {order[j]})",
                f"write it as {order[j]}..{order[i]}",
            )
        return order[i : j + 1]
    missing = [x for x in (first, last) if x not in lowered and x not in ALL_LABELS]
    raise LabelError(
        f"label range {token!r}: {', '.join(missing) or token} is not a label of any teacher",
        f"write FIRST..LAST with two of the teachers' labels: {', '.join(order)}",
    )
