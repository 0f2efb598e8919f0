"""Every preset's flags parse against the command that receives them (a typo or a value out of range
fails here, not mid-demo), and so does every command line ``experiments.reproduce`` plans."""
from __future__ import annotations

import dataclasses

import pytest

from common.cli import parse_config
from data.adapters.completejourney import CompleteJourneyConfig
from data.adapters.fashion import FashionConfig
from data.adapters.instacart import InstacartConfig
from data.synth.generate import SynthArgs
from data.validate import ValidateArgs
from embeddings.config import EmbeddingsTrainConfig, TableExportConfig
from embeddings.evaluate import EvaluateConfig
from experiments import reproduce
from experiments.presets import PRESETS
from ranking.config import RankingTrainConfig
from ranking.importance import ImportanceConfig
from serving.bench import ServingBenchConfig
from serving.export import ServingExportConfig
from serving.index import IndexConfig

# the config of each command that experiments.reproduce starts (python -m <module>)
COMMAND_CONFIGS: dict[str, type] = {
    "data.synth": SynthArgs, "data.validate": ValidateArgs, "data.adapters.fashion": FashionConfig,
    "data.adapters.instacart": InstacartConfig, "data.adapters.completejourney": CompleteJourneyConfig,
    "embeddings.train": EmbeddingsTrainConfig, "embeddings.export": TableExportConfig,
    "embeddings.evaluate": EvaluateConfig, "ranking.train": RankingTrainConfig, "ranking.importance": ImportanceConfig,
    "serving.export": ServingExportConfig, "serving.index": IndexConfig, "serving.bench": ServingBenchConfig,
}
SOURCES = ("synth:tiny", "synth:demo", "synth:paper", "fashion", "instacart", "completejourney")

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


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_planned_command_parses_against_its_command(name: str):
    """The whole command line of every stage, the flags ``reproduce`` sets itself included, for every source."""
    for source in SOURCES:
        for scale in (None, 0.01) if source.startswith("synth") else (None,):
            cfg = reproduce.ReproduceConfig(workdir="runs/x", source=source, preset=name, scale=scale, seeds=0)
            stages = reproduce.plan_stages(cfg, PRESETS[name])
            assert stages[0].name == "data" and "embeddings" in [s.name for s in stages]
            for stage in stages:
                for module, *argv in stage.commands:
                    parse_config(COMMAND_CONFIGS[module], argv)
