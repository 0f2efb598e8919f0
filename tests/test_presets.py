"""Every preset's flags parse against the command that receives them (a typo fails here, not mid-demo)."""
from __future__ import annotations

import dataclasses

import pytest

from common.cli import parse_config
from data.adapters.completejourney import CompleteJourneyConfig
from data.adapters.fashion import FashionConfig
from data.adapters.instacart import InstacartConfig
from embeddings.config import EmbeddingsTrainConfig
from embeddings.evaluate import EvaluateConfig
from experiments.presets import PRESETS
from ranking.config import RankingTrainConfig
from ranking.importance import ImportanceConfig
from serving.bench import ServingBenchConfig

STAGE_COMMANDS = {"embeddings_train": EmbeddingsTrainConfig, "embeddings_evaluate": EvaluateConfig,
                  "ranking_train": RankingTrainConfig, "importance": ImportanceConfig,
                  "serving_bench": ServingBenchConfig}
ADAPTERS = {"fashion": FashionConfig, "instacart": InstacartConfig, "completejourney": CompleteJourneyConfig}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_flag_parses_against_its_command(name: str):
    preset = PRESETS[name]
    fields = {f.name for f in dataclasses.fields(preset)}
    assert fields == {*STAGE_COMMANDS, "adapter_flags", "source_embeddings_train", "seeds"}  # a new stage needs a row
    parse_config(RankingTrainConfig, ["--seeds", str(preset.seeds), *preset.ranking_train])
    assert preset.seeds >= 1
    for stage, config in STAGE_COMMANDS.items():
        parse_config(config, list(getattr(preset, stage)))
    for source, flags in preset.adapter_flags.items():
        parse_config(ADAPTERS[source], list(flags))
    for source, flags in preset.source_embeddings_train.items():
        assert source in {*ADAPTERS, "synth"}  # the source kinds of experiments.reproduce
        parse_config(EmbeddingsTrainConfig, [*preset.embeddings_train, *flags])


def test_a_misspelt_flag_is_caught(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(EmbeddingsTrainConfig, ["--stage1-max-step", "3"])
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err
