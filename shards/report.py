"""What a build did: samples written per split, and samples skipped, counted by reason.

A shard build never stops on a bad sample. It skips it, counts it under one of the
reasons below and keeps a few examples (line numbers or paths) so the user can find
and fix the input. User mistakes that make the whole build impossible (a missing
captions file, a checksum mismatch) raise ``ShardsError`` instead: the CLI prints it
as one ``error: ...`` line.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

# Every reason a sample (or a caption) can be skipped for, in the order reports list them.
SKIP_REASONS = (
    "missing_image",  # the image file does not exist or cannot be read
    "corrupt_image",  # PIL cannot open, verify or decode it
    "too_many_pixels",  # width * height above --max-pixels (checked from the header)
    "empty_caption",  # no caption left after stripping: the sample is skipped
    "empty_caption_dropped",  # one empty caption dropped from a list: the sample stays
    "broken_json_line",  # a JSONL line that is not a JSON object
    "non_utf8_text",  # a line (or a caption) that is not valid UTF-8
    "missing_field",  # a required field (image, captions, filename...) is absent
    "bad_field",  # a field has the wrong type or an unusable value (split name, row index)
    "bad_feature",  # a feature row with NaN or Inf
)


class ShardsError(Exception):
    """A user-caused problem that stops the build; ``str(err)`` is one line."""


@dataclasses.dataclass
class SkipReport:
    """Counts of skipped samples by reason, with the first few examples of each."""

    max_examples: int = 3
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(where)

    def as_dict(self) -> dict[str, int]:
        """Counts in the canonical reason order (stable manifest output)."""
        return {r: self.counts[r] for r in SKIP_REASONS if self.counts[r]}

    def format_lines(self) -> list[str]:
        lines = []
        for reason, count in self.as_dict().items():
            examples = "; ".join(self.examples.get(reason, []))
            more = ", ..." if count > len(self.examples.get(reason, [])) else ""
            lines.append(f"  {reason}: {count} (e.g. {examples}{more})")
        return lines


@dataclasses.dataclass
class BuildReport:
    """Returned by every ``build_*`` function and printed by the CLI."""

    out_dir: Path
    builder: str
    samples: dict[str, int]  # split -> samples written
    shards: dict[str, int]  # split -> shard files written
    skipped: dict[str, int]  # reason -> count, for the whole build
    examples: dict[str, list[str]]  # reason -> a few line numbers / paths

    @property
    def num_samples(self) -> int:
        return sum(self.samples.values())

    def summary(self) -> str:
        splits = ", ".join(
            f"{split} {n} ({self.shards[split]} shards)" for split, n in self.samples.items()
        )
        lines = [f"{self.builder}: wrote {self.num_samples} samples to {self.out_dir}: {splits}"]
        if self.skipped:
            report = SkipReport(counts=collections.Counter(self.skipped), examples=self.examples)
            lines.append("skipped:")
            lines.extend(report.format_lines())
        else:
            lines.append("skipped: nothing")
        return "\n".join(lines)
