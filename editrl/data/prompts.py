"""The simplest dataset: instructions only (text-to-video policies, smoke tests)."""

from __future__ import annotations

from pathlib import Path

from pydantic import model_validator

from editrl.base import DataError, StrictModel
from editrl.types import EditSample


class PromptDataset:
    provides = frozenset({"instruction"})  # the EditSample fields it fills (preflight checks rewards' needs against it)

    class Options(StrictModel):
        prompts: list[str] | None = None
        file: str | None = None  # one prompt per line

        @model_validator(mode="after")
        def _one_source(self) -> "PromptDataset.Options":
            if (self.prompts is None) == (self.file is None):
                raise ValueError("give exactly one of `prompts` or `file`")
            if self.prompts is not None and not any(p.strip() for p in self.prompts):
                raise ValueError("`prompts` is empty: give at least one instruction")
            return self

        def check(self) -> None:
            if self.file is not None and not Path(self.file).is_file():
                raise FileNotFoundError(f"file {self.file} does not exist")

    def __init__(self, options: Options) -> None:
        options.check()
        prompts = options.prompts if options.prompts is not None else Path(options.file).read_text().splitlines()  # type: ignore[arg-type]
        self.prompts = [p.strip() for p in prompts if p.strip()]
        if not self.prompts:
            raise DataError(f"{options.file} holds no prompt: write one instruction per line")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> EditSample:
        return EditSample(id=f"prompt-{index}", instruction=self.prompts[index])
