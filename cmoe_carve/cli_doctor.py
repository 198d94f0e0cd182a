"""`cmoe doctor`: the environment, as a bug report needs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def doctor_command(
    json_out: Optional[str] = typer.Option(
        None, "--json", help="Write the report as JSON to this file ('-' for stdout).",
        show_default=False,
    ),
    build: bool = typer.Option(
        True, "--build/--no-build",
        help="Build the fused CPU step if needed to tell whether it works (about 20 s, once).",
    ),
) -> None:
    """Versions, which kernels are usable, cache folders and sizes, data directories found."""
    from .atomic import write_text_file
    from .doctor import as_text, report

    record = report(build_kernels=build)
    if json_out == "-":
        typer.echo(json.dumps(record, indent=2, sort_keys=True))
        return
    typer.echo(as_text(record))
    if json_out is not None:
        write_text_file(Path(json_out), json.dumps(record, indent=2, sort_keys=True) + "\n", "--json")
