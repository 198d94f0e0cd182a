"""`cmoe export`: options to the library's export."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def export_command(
    carved: Path = typer.Argument(..., help="A carved checkpoint directory (from `cmoe carve`)."),
    fmt: str = typer.Option(
        "hf", "--format", "-f",
        help="hf: a transformers-native glm4_moe checkpoint (no remote code; vLLM and SGLang "
        "load it too). gguf: a llama.cpp glm4moe GGUF file.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (hf) or .gguf file (gguf)."),
    quant: str = typer.Option("f32", help="gguf weight type: f32, f16, q8_0 or q4_0 (llama-quantize reads the f32/f16 file for any other type)."),
    approximate: bool = typer.Option(
        False, help="Allow documented approximations (compensation, selection bias, router scale, "
        "MoNE, sliding window) where the checkpoint has them; their effect is measured and recorded.",
    ),
    check_tokens: int = typer.Option(
        256, help="Tokens of the packaged WikiText-2 excerpt on which the export is compared with "
        "the carved model (0: no check).",
    ),
    router_eps: Optional[float] = typer.Option(
        None, help="hf: router temperature (glm4_moe selects on sigmoid scores; default 1e-3).",
    ),
    tokenizer_gguf: Optional[Path] = typer.Option(
        None, help="gguf: copy the tokenizer metadata from this GGUF file (default: the carve's "
        "source GGUF if it has one, else the checkpoint's Hugging Face tokenizer, converted).",
    ),
    hf_tokenizer: bool = typer.Option(
        False, help="gguf: convert the checkpoint's Hugging Face tokenizer even when the carve "
        "started from a GGUF file.",
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing --out."),
) -> None:
    """Export a carved checkpoint for engines that run it without this project's code."""
    from .export import export

    export(
        carved, fmt, out, quant=quant, approximate=approximate, check=check_tokens,
        eps=router_eps, tokenizer_gguf=tokenizer_gguf,
        hf_tokenizer=hf_tokenizer, overwrite=overwrite, echo=typer.echo,
    )
