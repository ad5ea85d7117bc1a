"""The typed pipeline API and the CLI built from it (no model is trained here)."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from export import cli, pipeline
from export.cladec import ClaDecConfig
from export.concepts import ConceptConfig

#: The fewest arguments each step's subcommand accepts.
REQUIRED = {
    "render": [], "digits": [], "build-demo": [],
    "train": ["--data", "d", "--out", "o"],
    "export": ["--out", "o"],
    "concepts": ["--bundle", "b", "--data", "d"],
    "cladec": ["--bundle", "b", "--data", "d"],
    "features": ["--bundle", "b", "--data", "d"],
    "analyze": ["--bundle", "b", "--data", "d"],
    "archive": ["--bundle", "b"],
}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p.populate() for name, p in action.choices.items()}


def _config(argv: list[str]):
    args = cli.build_parser().parse_args(argv)
    cls, _ = pipeline.STEPS[argv[0]]
    return cli.config_from_args(cls, args)


def test_every_step_has_a_subcommand_and_every_option_states_its_default():
    subs = _subparsers(cli.build_parser())
    assert set(pipeline.STEPS) <= set(subs) and {"query", "demo-report"} <= set(subs)
    for name, sub in subs.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
            assert action.required or "default" in action.help.lower(), \
                f"{name} {action.option_strings}: help does not state the default: {action.help!r}"


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_cli_defaults_are_the_dataclass_defaults(name: str):
    """With only the required options, the CLI builds the config the API builds with the same
    required fields: the defaults are the dataclasses' (written once)."""
    argv = REQUIRED[name]
    given = {argv[i][2:].replace("-", "_"): Path(argv[i + 1]) for i in range(0, len(argv), 2)}
    cls, _ = pipeline.STEPS[name]
    assert _config([name, *argv]) == cls(**given)


def test_cli_options_reach_the_nested_configs():
    cfg = _config(["concepts", "--bundle", "b", "--data", "d", "--classifier", "c", "--k", "4",
                   "--layers", "layer1, layer3", "--backoff", "2.5", "--intervention-images", "10",
                   "--limit", "7"])
    assert cfg == pipeline.ConceptsStep(
        bundle=Path("b"), data=Path("d"), model=pipeline.ModelSource(classifier=Path("c")), limit=7,
        concepts=ConceptConfig(k=4, layers=("layer1", "layer3"), backoff=2.5, intervention_images=10))
    cd = _config(["cladec", "--bundle", "b", "--data", "d", "--alphas", "0,0.5", "--epochs", "2"])
    assert cd.cladec == ClaDecConfig(alphas=(0.0, 0.5), epochs=2)
    ex = _config(["export", "--out", "o", "--model-file", "net.py", "--model-class", "Net", "--weights", "w",
                  "--classes", "a,b", "--size", "32", "--channels", "1", "--mean", "0.1", "--std", "0.2"])
    assert ex.model == pipeline.ModelSource(model_file=Path("net.py"), model_class="Net", weights=Path("w"),
                                            classes=("a", "b"), size=32, channels=1, mean=(0.1,), std=(0.2,))
    assert _config(["analyze", "--bundle", "b", "--data", "d", "--no-names"]).name_concepts is False
    assert _config(["archive", "--bundle", "b", "--accept-failed-checks"]).accept_failed_checks is True
    demo = _config(["build-demo", "--accept-failed-checks", "--force", "--epochs", "1"])
    assert demo.accept_failed_checks and demo.force and demo.epochs == 1
    assert _config(["train", "--data", "d", "--out", "o", "--max-steps", "3"]).training.max_steps == 3


@dataclass(frozen=True)
class Inner:
    """A method's config that gained a field nobody wrote CLI code for."""

    new_knob: float = 0.25
    names: tuple[str, ...] = ("a",)
    mode: Literal["fast", "exact"] = "fast"


@dataclass(frozen=True)
class Step:
    out: Path = field(metadata={"help": "where"})
    inner: Inner = field(default_factory=Inner)


def test_a_new_config_field_becomes_an_option_without_cli_code():
    parser = argparse.ArgumentParser()
    cli.add_config_options(parser, Step)
    assert cli.config_from_args(Step, parser.parse_args(["--out", "x"])) == Step(out=Path("x"))
    got = cli.config_from_args(Step, parser.parse_args(["--out", "x", "--new-knob", "2", "--names", "b,c",
                                                        "--mode", "exact"]))
    assert got == Step(out=Path("x"), inner=Inner(new_knob=2.0, names=("b", "c"), mode="exact"))
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--mode", "slow"])
    assert "(default: 0.25)" in parser.format_help()


def test_defaults_shared_between_steps_are_written_once():
    demo = pipeline.BuildDemoStep()
    render = pipeline.RenderStep()
    assert (demo.data, demo.n_train, demo.n_test, demo.seed) == (render.out, render.n_train, render.n_test,
                                                                 render.seed)
    assert demo.model_store == pipeline.ArchiveStep(bundle=Path("b")).model_store
    assert (demo.name, demo.version) == (pipeline.ExportStep(out=Path("o")).name,
                                         pipeline.ExportStep(out=Path("o")).version)


def test_main_returns_non_zero_when_a_step_cannot_run(tmp_path: Path, capsys):
    assert cli.main(["export", "--out", str(tmp_path / "bundle")]) == 1
    assert "--classifier" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists()
    with pytest.raises(pipeline.PipelineError):
        pipeline.load_classifier(pipeline.ModelSource(model_file=tmp_path / "net.py", model_class="Net",
                                                      weights=tmp_path / "w.safetensors"))


def test_step_configs_are_frozen():
    step = pipeline.ArchiveStep(bundle=Path("b"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.name = "x"  # type: ignore[misc]
