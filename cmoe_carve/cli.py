"""The `cmoe` command. Options are parsed here and handed to the library; no logic lives here."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable

import typer

from .errors import CmoeError

app = typer.Typer(
    help="Carve a dense Hugging Face language model into a sparse Mixture-of-Experts (CMoE).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def user_errors(fn: Callable) -> Callable:
    """Turn a CmoeError into one line on stderr and exit code 2, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        from .memory_reuse import reuse_freed_memory

        reuse_freed_memory()  # every command makes large tensors: see memory_reuse
        if kwargs.get("progress") is False:  # --no-progress: transformers' loading bars too
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        try:
            return fn(*args, **kwargs)
        except CmoeError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


def _register() -> None:
    # Each command lives in its own module; importing them here keeps `cmoe --help` complete.
    from . import (
        cli_bench, cli_carve, cli_doctor, cli_eval, cli_export, cli_finetune, cli_neuron_keep,
    )

    app.command("carve")(user_errors(cli_carve.carve_command))
    app.command("eval")(user_errors(cli_eval.eval_command))
    app.command("bench")(user_errors(cli_bench.bench_command))
    app.command("finetune")(user_errors(cli_finetune.finetune_command))
    app.command("neuron-keep")(user_errors(cli_neuron_keep.neuron_keep_command))
    app.command("doctor")(user_errors(cli_doctor.doctor_command))
    app.command("export")(user_errors(cli_export.export_command))


_register()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
