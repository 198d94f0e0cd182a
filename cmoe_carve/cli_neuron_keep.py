"""`cmoe neuron-keep`: change the MoNE keep ratios stored in a carved checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def neuron_keep_command(
    checkpoint: Path = typer.Argument(..., help="A carved checkpoint directory.", show_default=False),
    ratio: Optional[float] = typer.Argument(
        None,
        help="Fraction of each active routed expert's neurons a token keeps, by |act(gate x)| "
        "(1.0: off). Omit to show the current ratios.",
        show_default=False,
    ),
    shared: Optional[float] = typer.Option(
        None, "--shared", help="Keep ratio of the shared experts (default: unchanged).",
        show_default=False,
    ),
) -> None:
    """Show or set the neuron keep ratios (MoNE) of a carved checkpoint, without carving again."""
    from .checkpoint import read_cmoe_config
    from .mone import ffn_active_fraction, ffn_read_fraction, rewrite_neuron_keep
    from .modeling_cmoe import keep_count

    cmoe = read_cmoe_config(checkpoint)
    if ratio is not None or shared is not None:
        cmoe = rewrite_neuron_keep(checkpoint, ratio, shared)
    m = cmoe["expert_size"]
    routed, shared_ratio = cmoe.get("neuron_keep", 1.0), cmoe.get("shared_neuron_keep", 1.0)
    typer.echo(
        f"{checkpoint}: neuron keep {routed} for routed experts ({keep_count(routed, m)} of {m} "
        f"neurons), {shared_ratio} for shared ({keep_count(shared_ratio, m)} of {m}); "
        f"FFN neurons active per token {ffn_active_fraction(cmoe):.3f}, FFN weights read "
        f"{ffn_read_fraction(cmoe):.3f}"
    )
