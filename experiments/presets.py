"""Stage flags per preset: ``tiny`` (tests, seconds), ``demo`` (the 2-core budget of `make demo`),
``full`` (the paper-size settings). Each tuple is appended to that stage's command line."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    embeddings_train: tuple[str, ...] = ()
    embeddings_evaluate: tuple[str, ...] = ()
    ranking_train: tuple[str, ...] = ()
    importance: tuple[str, ...] = ()
    serving_bench: tuple[str, ...] = ()
    adapter_flags: dict[str, tuple[str, ...]] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(),
    "demo": Preset(),
    "full": Preset(),
}
