"""The carved checkpoint: a Hugging Face model directory that loads with trust_remote_code.

Written to a temporary sibling directory and renamed into place at the end, so that an
interrupted write never leaves a directory that looks complete.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch
import transformers

from . import __version__, modeling_cmoe
from .atomic import atomic_directory, check_output_dir  # noqa: F401 - re-exported for callers
from .errors import CheckpointError
from .loading import parse_dtype
from .validate import check_model_dir, read_config

MODELING_FILE = "modeling_cmoe.py"
REPORT_FILE = "carve_report.json"
AUTO_MAP = {
    "AutoConfig": "modeling_cmoe.CmoeConfig",
    "AutoModelForCausalLM": "modeling_cmoe.CmoeForCausalLM",
}


def carved_classes(cmoe: dict):
    """(CmoeConfig, CmoeForCausalLM) for the source architecture named in `cmoe`."""
    try:
        base_config = getattr(transformers, cmoe["base_config_class"])
        base_model = getattr(transformers, cmoe["base_model_class"])
    except (KeyError, AttributeError) as err:
        raise CheckpointError(
            f"checkpoint names an architecture this transformers {transformers.__version__} "
            f"lacks ({err}): upgrade transformers"
        ) from None
    return modeling_cmoe.build_classes(base_config, base_model)


def modeling_source(cmoe: dict) -> str:
    """modeling_cmoe.py for the checkpoint: the module's source bound to the base classes."""
    body = Path(modeling_cmoe.__file__).read_text()
    return (
        body
        + "\n\n# Bound to the source architecture when this checkpoint was written.\n"
        + f"from transformers import {cmoe['base_config_class']} as _CmoeBaseConfig  # noqa: E402\n"
        + f"from transformers import {cmoe['base_model_class']} as _CmoeBaseModel  # noqa: E402\n\n"
        + "CmoeConfig, CmoeForCausalLM = build_classes(_CmoeBaseConfig, _CmoeBaseModel)\n"
    )


def as_carved_model(model: torch.nn.Module, cmoe: dict) -> torch.nn.Module:
    """Give a model whose MLPs were replaced in place the carved classes and config."""
    config_cls, model_cls = carved_classes(cmoe)
    values = model.config.to_dict()
    for key in ("model_type", "quantization_config", "auto_map", "architectures", "cmoe"):
        values.pop(key, None)
    config = config_cls(**values)
    config.cmoe = cmoe
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["CmoeForCausalLM"]
    # The model class differs from its base only in __init__, so switching classes is safe.
    model.__class__ = model_cls
    model.config = config
    model.hf_quantizer = None
    model.is_quantized = False
    return model


def routed_budget(cmoe: dict) -> str:
    """How many routed experts a token uses: "2", or "on average 2 (1-4 by layer)" when
    layer-adaptive budgets differ between layers."""
    top_k = cmoe["top_k"] if isinstance(cmoe["top_k"], list) else [cmoe["top_k"]]
    if min(top_k) == max(top_k):
        return str(top_k[0])
    mean = sum(top_k) / len(top_k)
    return f"on average {mean:.3g} ({min(top_k)}-{max(top_k)} by layer)"


def model_card(cmoe: dict, meta: dict) -> str:
    from .mone import ffn_active_fraction, ffn_read_fraction

    calib = meta.get("calibration", {})
    lines = [
        "---",
        "library_name: transformers",
        "tags: [cmoe, mixture-of-experts, carved]",
        "---",
        f"# {meta.get('source_model', 'model')} carved into a Mixture-of-Experts ({cmoe['spec']})",
        "",
        # No public home page yet: name the tool and its version rather than link a placeholder.
        f"Made with cmoe-carve {__version__} ([CMoE, arXiv 2502.04416]"
        "(https://arxiv.org/abs/2502.04416)): the dense FFNs were",
        "cut into shared and routed experts without retraining.",
        "",
        "| | |",
        "|---|---|",
        f"| source model | {meta.get('source_model')} |",
        f"| spec | {cmoe['spec']}: {cmoe['num_shared']} shared + {routed_budget(cmoe)} of "
        f"{cmoe['num_experts'] - cmoe['num_shared']} routed experts, {cmoe['expert_size']} neurons each |",
        f"| active FFN fraction | {ffn_active_fraction(cmoe):.3f} (FFN weights read per token: {ffn_read_fraction(cmoe):.3f}) |",
        f"| neuron keep (MoNE) | routed {cmoe.get('neuron_keep', 1.0)}, shared {cmoe.get('shared_neuron_keep', 1.0)} |",
        f"| calibration text | {calib.get('description', calib)} |",
        f"| calibration tokens | {meta.get('calibration_tokens')} ({meta.get('calibration_windows')} x {meta.get('seqlen')}) |",
        f"| K_a, seed | {cmoe['k_act']}, {meta.get('seed')} |",
        f"| carve time | {meta.get('carve_seconds', 0):.1f} s (model loading excluded) |",
        f"| carved at | {meta.get('created')} |",
        f"| cmoe-carve | {__version__} |",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)  # no prompt",
        "```",
        "",
        f"Per-layer statistics: `{REPORT_FILE}`.",
    ]
    if "attribution" in calib:
        lines += ["", f"Calibration data: {calib['attribution']}"]
    return "\n".join(lines) + "\n"


def save_carved(
    model: torch.nn.Module,
    tokenizer,
    out: Path,
    cmoe: dict,
    report: dict,
    meta: dict,
    overwrite: bool = False,
) -> Path:
    """Write the carved model, tokenizer, modeling code, card and report to `out`, atomically."""
    with atomic_directory(Path(out), overwrite) as tmp:
        model = as_carved_model(model, stamped(cmoe))
        model.save_pretrained(tmp)
        write_beside_weights(model, tokenizer, tmp, report, meta)
    return Path(out)


def stamped(cmoe: dict) -> dict:
    return {**cmoe, "cmoe_carve_version": __version__}


def write_beside_weights(model, tokenizer, tmp: Path, report: dict, meta: dict,
                         config_too: bool = False) -> None:
    """Everything of a carved checkpoint but its weights: tokenizer, modeling code, report, card
    (and, for weights written shard by shard, the config and generation config)."""
    cmoe = model.config.cmoe
    meta = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **meta}
    if config_too:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MODELING_FILE).write_text(modeling_source(cmoe))
    (tmp / REPORT_FILE).write_text(
        json.dumps({"meta": meta, "cmoe": cmoe, **report}, indent=2, sort_keys=True)
    )
    (tmp / "README.md").write_text(model_card(cmoe, meta))


def read_carved_config(path: Path) -> dict:
    """The whole config.json of a carved checkpoint; CheckpointError for anything else."""
    if not Path(path).is_dir():
        raise CheckpointError(f"{path} is not a directory: pass a carved checkpoint (from `cmoe carve`)")
    values = read_config(Path(path))
    if not isinstance(values.get("cmoe"), dict):
        raise CheckpointError(f"{path} is not a carved checkpoint (no `cmoe` in config.json): run `cmoe carve` first")
    return values


def read_cmoe_config(path: Path) -> dict:
    return read_carved_config(path)["cmoe"]


def load_carved(
    path: str | Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: str | None = None,
) -> torch.nn.Module:
    """Load a carved checkpoint with this package's classes (no remote code needed)."""
    path = Path(path)
    cmoe = read_cmoe_config(path)
    check_model_dir(path)
    _, model_cls = carved_classes(cmoe)
    placement = {"device_map": device_map} if device_map else {}
    model = model_cls.from_pretrained(path, dtype=parse_dtype(dtype), **placement)
    if not device_map:
        model.to(device)
    return model.eval()
