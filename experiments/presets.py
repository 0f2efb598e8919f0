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
    # extra embeddings.train flags per real source (after embeddings_train)
    source_embeddings_train: dict[str, tuple[str, ...]] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        embeddings_train=("--backbone", "tiny", "--image-size", "32", "--stage1-batch-size", "16",
                          "--stage1-max-steps", "4", "--eval-every", "2", "--stage1-eval-max", "32",
                          "--stage2-batch-size", "16", "--stage2-max-steps", "4", "--pqc-negatives", "4",
                          "--stage2-eval-max", "32", "--threads", "1"),
        embeddings_evaluate=("--probe-epochs", "3", "--tsne-points", "120"),
        ranking_train=("--epochs", "1", "--checks-per-epoch", "2", "--patience", "2", "--batch-size", "256",
                       "--eval-batch-size", "512", "--threads", "1", "--workers", "1"),
        importance=("--repeats", "2", "--ig-steps", "8", "--threads", "1", "--max-rows", "300"),
        serving_bench=("--iters", "30", "--warmup", "3", "--http-requests", "48", "--http-seconds", "30"),
        adapter_flags={"fashion": ("--limit", "400"), "completejourney": ("--households", "40")},
    ),
    # real sources: one stage-2 epoch keeps each within the ~1 hour `make real` budget on 2 cores
    # (completejourney alone has ~50k products and ~25k PQC tuples)
    "demo": Preset(source_embeddings_train={source: ("--stage2-epochs", "1")
                                            for source in ("fashion", "instacart", "completejourney")}),
    "full": Preset(),
}
