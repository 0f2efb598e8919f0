"""Flag rules: field metadata checked by common.cli (one ``error:`` line naming the flag, exit code 2),
cross-field rules in a config's ``check()``, and one meaning and default of ``--threads``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from common.cli import (DEFAULT_THREADS, UserError, available_cores, check_config, parse_config, resolve_threads,
                        run_main)
from tests.test_presets import COMMAND_CONFIGS


@dataclass
class _Rules:
    count: int = field(default=1, metadata={"help": "a count", "min": 1})
    share: float = field(default=0.5, metadata={"help": "a share", "min": 0.0, "max": 1.0})
    fraction: Optional[float] = field(default=None, metadata={"help": "a fraction", "gt": 0.0, "max": 1.0})
    below_one: float = field(default=0.0, metadata={"help": "in [0, 1)", "min": 0.0, "lt": 1.0})
    sizes: list[int] = field(default_factory=lambda: [4], metadata={"help": "widths", "min": 1, "min_items": 1})
    sweep: list[int] = field(default_factory=list, metadata={"help": "values", "min": 1})
    kinds: list[str] = field(default_factory=lambda: ["a"], metadata={"help": "kinds", "choices": ["a", "b"],
                                                                      "min_items": 1})
    profile: str = field(default="demo", metadata={"help": "a profile", "choices": ("tiny", "demo")})
    mode: Literal["fast", "slow"] = "fast"

    def check(self) -> None:
        if self.count > len(self.sizes) + 5:
            raise UserError(f"--count ({self.count}) must not exceed 5 + the number of --sizes ({len(self.sizes)})")


@pytest.mark.parametrize("argv, message", [
    (["--count", "0"], "--count must be >= 1, got 0"),
    (["--share", "1.5"], "--share must be in [0, 1], got 1.5"),
    (["--fraction", "0"], "--fraction must be in (0, 1], got 0.0"),
    (["--below-one", "1"], "--below-one must be in [0, 1), got 1.0"),
    (["--sizes"], "--sizes must be one or more values >= 1, got []"),
    (["--sizes", "3", "0"], "--sizes must be one or more values >= 1, got [3, 0]"),
    (["--sweep", "2", "0"], "--sweep values must be >= 1, got [2, 0]"),
    (["--kinds"], "--kinds must be one or more of a, b, got []"),
    (["--count", "7"], "--count (7) must not exceed 5 + the number of --sizes (1)"),  # check(), after the fields
])
def test_a_broken_rule_is_a_user_error_naming_the_flag(argv: list[str], message: str):
    with pytest.raises(UserError) as raised:
        parse_config(_Rules, argv)
    assert str(raised.value) == message


@pytest.mark.parametrize("argv, needle", [
    (["--profile", "huge"], "unknown --profile 'huge'; expected one of tiny, demo"),
    (["--mode", "medium"], "unknown --mode 'medium'; expected one of fast, slow"),  # a Literal
    (["--kinds", "a", "c"], "unknown --kinds 'c'; expected one of a, b"),
])
def test_a_value_outside_the_choices_is_a_parser_error(argv: list[str], needle: str, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(_Rules, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_a_config_built_in_code_is_checked_the_same_way():
    assert parse_config(_Rules, ["--fraction", "1", "--sweep", "1", "2"]) == _Rules(fraction=1.0, sweep=[1, 2])
    check_config(_Rules())
    with pytest.raises(UserError, match=r"^--share must be in \[0, 1\], got -0.1$"):
        check_config(_Rules(share=-0.1))
    with pytest.raises(UserError, match=r"^unknown --profile 'huge'; expected one of tiny, demo$"):
        check_config(_Rules(profile="huge"))
    with pytest.raises(UserError, match=r"^unknown --mode 'medium'"):
        check_config(_Rules(mode="medium"))  # type: ignore[arg-type]
    with pytest.raises(UserError, match="--share must be"):
        check_config(_Rules(share=float("nan")))


def _main(module: str):
    import importlib

    return importlib.import_module(module).main


@pytest.mark.parametrize("module, argv, line", [
    ("ranking.train", ["--seeds", "0"], "error: --seeds must be >= 1, got 0"),
    ("ranking.importance", ["--ig-steps", "1"], "error: --ig-steps must be >= 2, got 1"),
    ("embeddings.train", ["--stage1-eval-fraction", "1"], "error: --stage1-eval-fraction must be in [0, 1), got 1.0"),
    ("data.synth.generate", ["--scale", "0"], "error: --scale must be > 0, got 0.0"),
    ("serving.server", ["--port", "70000"], "error: --port must be in [1, 65535], got 70000"),
    ("serving.index", ["--bench-kinds"], "error: --bench-kinds must be one or more of exact, hnsw, ivf, got []"),
    ("serving.bench", ["--funnel-k", "300"], "error: --funnel-k (300) must not exceed --funnel-candidates (200)"),
    ("experiments.reproduce", ["--scale", "1.5"], "error: --scale must be in (0, 1], got 1.5"),
    ("experiments.gpu_bench", ["--benches"], "error: --benches must be one or more of embeddings, ranking, serving, "
                                             "index, got []"),
    ("serving.export", ["--threads", "-1"], "error: --threads must be >= 0, got -1"),
    ("embeddings.evaluate", ["--threads", "-2"], "error: --threads must be >= 0, got -2"),
])
def test_a_bad_flag_of_a_command_is_one_error_line_and_exit_2(module: str, argv: list[str], line: str,
                                                             tmp_path: Path, capsys):
    workdir = tmp_path / "w"
    with pytest.raises(SystemExit) as exc:
        run_main(_main(module), ["--workdir", str(workdir), *argv])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]
    assert not workdir.exists()  # checked before anything is written


def test_a_value_outside_a_commands_choices_is_one_error_line(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_main(_main("ranking.importance"), ["--workdir", str(tmp_path / "w"), "--method", "shap"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("error: ") and "unknown --method 'shap'; expected one of permutation, ablation" in lines[0]


def test_every_commands_defaults_keep_its_rules():
    for module, config in COMMAND_CONFIGS.items():
        if module == "data.validate":
            continue
        check_config(config())


def test_threads_mean_the_same_in_every_command():
    """Every command config with ``--threads`` has the shared default and bound; 0 is every core."""
    from embeddings.config import EmbeddingsBenchConfig
    from ranking.bench import RankingBenchConfig
    from serving.add_products import AddProductsConfig
    from serving.server import ServerConfig

    configs = {*COMMAND_CONFIGS.values(), EmbeddingsBenchConfig, RankingBenchConfig, AddProductsConfig, ServerConfig}
    with_threads = {c for c in configs if "threads" in {f.name for f in dataclasses.fields(c)}}
    assert len(with_threads) == 10, sorted(c.__name__ for c in with_threads)
    for config in with_threads:
        threads = next(f for f in dataclasses.fields(config) if f.name == "threads")
        assert (threads.default, threads.metadata["min"]) == (DEFAULT_THREADS, 0), config.__name__
        assert "0 = every core" in threads.metadata["help"], config.__name__
    assert resolve_threads(0) == available_cores() >= 1 and resolve_threads(3) == 3
