"""The dataset contract: an indexable collection of EditSample, built from recipe options."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from editrl.types import EditSample


@runtime_checkable
class EditDataset(Protocol):
    """`data.train.kind` names a registered class `cls(options)` implementing this (options: its `Options`)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> EditSample: ...


def build_dataset(kind: str, options: dict[str, Any]) -> EditDataset:
    from editrl.registry import DATASETS

    opts_cls = getattr(DATASETS.get(kind), "Options", None)
    if opts_cls is not None:
        return DATASETS.build(kind, opts_cls.model_validate(options))
    return DATASETS.build(kind, **options)
