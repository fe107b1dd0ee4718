"""The ``e2kd`` command line: thin click commands, each calling one library function."""

from __future__ import annotations

import os

import click

from e2kd import __version__


def _ray_defaults() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="e2kd")
def main() -> None:
    """e2kd: explanation-enhanced knowledge distillation with a cached teacher.

    Cache a teacher's logits and explanation maps once (cache-teacher), then train students from the
    cache without the teacher (train-student).
    """
    _ray_defaults()


@main.command("explainers")
def explainers_cmd() -> None:
    """List the registered explanation methods and their families."""
    from e2kd.explain import explainer_family, list_explainers

    for name in list_explainers():
        click.echo(f"{name}\t(family: {explainer_family(name)})")


if __name__ == "__main__":
    main()
