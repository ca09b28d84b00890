"""The README's CLI and config references stay in sync with the code."""

import click
import typer.main

from tests.conftest import REPO
from tuneship.cli import app
from tuneship.config import Config

README = (REPO / "README.md").read_text(encoding="utf-8")


def config_keys(model, prefix=""):
    for name, field in model.model_fields.items():
        if hasattr(field.annotation, "model_fields"):
            yield from config_keys(field.annotation, f"{prefix}{name}.")
        else:
            yield prefix + name


def cli_commands(command, path=()):
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from cli_commands(sub, path + (name,))
    else:
        yield " ".join(path), command


def test_every_config_key_is_in_the_config_reference():
    missing = [key for key in config_keys(Config) if f"| `{key}` |" not in README]
    assert not missing


def test_every_command_and_option_is_in_the_cli_reference():
    missing = []
    for name, command in cli_commands(typer.main.get_command(app)):
        if f"`tuneship {name}" not in README:
            missing.append(name)
        for param in command.params:
            for option in param.opts:
                if option.startswith("--") and option != "--help" and option not in README:
                    missing.append(f"{name} {option}")
    assert not missing


def test_every_source_file_the_readme_names_exists():
    import re

    named = set(re.findall(r"`((?:loop|serve|chat|data|train|evaluate|export|deploy|hub)/[\w/]+\.py)`", README))
    assert named, "the README's code table names no files"
    assert sorted(f for f in named if not (REPO / "src" / "tuneship" / f).is_file()) == []
