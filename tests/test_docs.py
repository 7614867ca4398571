"""The reference in docs/ covers the product: every recipe field and every command and option is documented."""

from __future__ import annotations

import re

import click
import pytest

from mzconvert.cli import main
from mzconvert.recipe.schema import FIELDS
from tests.conftest import ROOT

RECIPES_DOC = (ROOT / "docs" / "recipes.md").read_text()
CLI_DOC = (ROOT / "docs" / "cli.md").read_text()


@pytest.mark.parametrize("section", list(FIELDS))
def test_every_recipe_field_is_in_the_reference(section):
    """Each field appears as a YAML key (`field:`) in docs/recipes.md, where a reader of that section looks."""
    missing = [f for f in FIELDS[section] if not re.search(rf"(^|[\s{{,]){re.escape(f)}:", RECIPES_DOC, re.M)]
    assert not missing, f"docs/recipes.md does not document {section or 'top-level'} fields {missing}"


def _commands(group: click.Group, prefix: str = ""):
    for name, command in sorted(group.commands.items()):
        yield prefix + name, command


@pytest.mark.parametrize("name,command", list(_commands(main)))
def test_every_command_and_option_is_in_the_cli_reference(name, command):
    assert re.search(rf"^\s+(\S+\|)*{re.escape(name)}(\||\s)", CLI_DOC, re.M), f"docs/cli.md has no line for {name}"
    options = [o for p in command.params if isinstance(p, click.Option) for o in p.opts if o.startswith("--")]
    missing = [o for o in options if o not in CLI_DOC]
    assert not missing, f"docs/cli.md does not document {name} {missing}"


def test_the_group_options_are_in_the_cli_reference():
    options = [o for p in main.params if isinstance(p, click.Option) for o in p.opts if o.startswith("--")]
    assert [o for o in options if o not in CLI_DOC] == []


def test_the_readme_links_every_reference_page():
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, page.name
