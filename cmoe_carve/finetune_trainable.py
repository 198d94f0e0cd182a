"""What a fine-tune trains and in what order: the LoRA targets and the trainable parameters of
each mode, their optimizer groups, the learning-rate schedule, and the fixed plan of windows for
every step (the same on resumption)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .balance import carved_mlps
from .finetune_config import ATTENTION_PROJECTIONS, EXPERT_PARAMETERS, FinetuneConfig, FinetuneError


def lora_targets(cmoe: dict, experts: bool = True) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) for peft: attention projections by module name, the
    stacked expert weights of every carved MLP by full parameter name (none without `experts`)."""
    params = [f"{name}.{p}" for name in cmoe["mlp_names"] for p in EXPERT_PARAMETERS]
    return list(ATTENTION_PROJECTIONS), params if experts else []


def wrap_lora(model: nn.Module, cmoe: dict, config: FinetuneConfig) -> nn.Module:
    """The model with LoRA adapters (peft), everything else frozen."""
    from peft import LoraConfig, get_peft_model

    modules, params = lora_targets(cmoe, config.lora_experts)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,  # peft cannot apply dropout to a LoRA on a bare nn.Parameter
        target_modules=modules,
        target_parameters=params,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():  # peft reads transformers' deprecated attribute
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            return get_peft_model(model, lora)
    except ValueError as err:  # peft's "not found" errors, e.g. a family with other names
        raise FinetuneError(
            f"cannot place LoRA adapters on {', '.join(modules)} and the experts' "
            f"{', '.join(EXPERT_PARAMETERS)}: {err}"
        ) from err


def prepare_trainable(model: nn.Module, cmoe: dict, config: FinetuneConfig) -> nn.Module:
    """Wrap and (un)freeze for `config.mode`; the router scales train in every mode.

    The official CMoE code wraps with PEFT after making `u` trainable, and PEFT then freezes it;
    here `u` is made trainable after wrapping, and the first step checks that it gets gradients.
    """
    if config.mode == "lora":
        model = wrap_lora(model, cmoe, config)
    else:
        for p in model.parameters():
            p.requires_grad_(config.mode == "full")
    for mlp in carved_mlps(model):
        mlp.router.scale.requires_grad_(True)
    return model


def parameter_groups(model: nn.Module, config: FinetuneConfig) -> list[dict]:
    """Adam groups: the router scales at router_lr, every other trainable weight at the main lr."""
    scales = {id(mlp.router.scale) for mlp in carved_mlps(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    main = [p for p in trainable if id(p) not in scales]
    groups = [{"params": [p for p in trainable if id(p) in scales], "lr": config.router_lr,
               "name": "router_scale"}]
    if main:
        groups.append({"params": main, "lr": config.main_lr, "name": config.mode})
    return groups


def lr_factor(step: int, total: int, config: FinetuneConfig) -> float:
    """Multiplier of every group's lr before optimizer step `step` (0-based): linear warmup over
    warmup_ratio of the steps, then constant, cosine or linear decay to 10% of the peak."""
    warmup = int(config.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if config.schedule == "constant" or total - warmup <= 1:
        return 1.0
    progress = (step - warmup) / (total - warmup - 1)  # 0 .. 1
    if config.schedule == "linear":
        return 1.0 - 0.9 * progress
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# Data order


def step_plan(
    n_windows: int, batch_size: int, grad_accum: int, epochs: float, world: int, seed: int
) -> list[list[torch.Tensor]]:
    """Window indices of every micro-batch of every optimizer step, fixed by the seed.

    Each epoch draws a permutation (seed + epoch); it is cut into global micro-batches of
    batch_size * world windows (a remainder is left out), grouped grad_accum at a time into
    steps (the last step of an epoch may hold fewer). A fractional `epochs` (1.5) ends with the
    first micro-batches of the last epoch's permutation, as many as the fraction asks (at
    least one in all). Process r uses rows r*batch_size ...
    """
    global_batch = batch_size * world
    per_epoch = n_windows // global_batch
    if per_epoch == 0:
        raise FinetuneError(
            f"--samples {n_windows} is fewer than one global batch of {global_batch} windows "
            f"(--batch-size {batch_size} x {world} processes): raise --samples"
        )
    total = max(1, round(epochs * per_epoch))  # micro-batches over all epochs
    plan: list[list[torch.Tensor]] = []
    for epoch in range(math.ceil(total / per_epoch)):
        order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed + epoch))
        here = min(per_epoch, total - epoch * per_epoch)
        micro = [order[i * global_batch : (i + 1) * global_batch] for i in range(here)]
        plan += [micro[i : i + grad_accum] for i in range(0, here, grad_accum)]
    return plan
