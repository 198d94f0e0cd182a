"""What `cmoe finetune` writes: the merged checkpoint with its training record, loss curve and
model-card section, renamed into place whole."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch

from . import __version__
from .atomic import holds_output_lock
from .balance import carved_mlps
from .checkpoint import REPORT_FILE, atomic_directory, save_carved
from .finetune_config import ATTENTION_PROJECTIONS, EXPERT_PARAMETERS


def _source_report(carved_dir: Path) -> dict:
    path = carved_dir / REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _saved_dtype(carved_dir: Path) -> str:
    values = json.loads((carved_dir / "config.json").read_text())
    name = str(values.get("dtype") or values.get("torch_dtype") or "float32")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


@holds_output_lock  # one writer per --out (and per state file beside it)

def write_output(model, tokenizer, carved_dir, out, cmoe, config, source, summary, history,
                  n_trainable, accelerator, overwrite) -> None:
    """The merged checkpoint, its loss curve and its training record, renamed into place whole."""
    model.to(device="cpu", dtype=getattr(torch, _saved_dtype(carved_dir)))
    mlps = carved_mlps(model)
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record = {
        **summary,
        "created": created,
        "cmoe_carve_version": __version__,
        "source_checkpoint": str(carved_dir),
        "config": config.to_dict(),
        "data": {**source.to_record(), "description": source.describe()},
        "windows": config.samples,
        "trainable_parameters": n_trainable,
        "lora_targets": (list(ATTENTION_PROJECTIONS)
                         + (list(EXPERT_PARAMETERS) if config.lora_experts else []))
        if config.mode == "lora" else [],
        "processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "resumed_at_steps": history["resumed_at"],
        # The --distill teacher's targets, made once: on a CPU in a thread of their own beside
        # the first `teacher_beside_steps` steps (whose "seconds" then include the wait for
        # any not yet made), elsewhere before training (outside "seconds").
        "teacher_seconds": round(history.get("teacher_seconds", 0.0), 4),
        "teacher_beside_steps": history.get("teacher_beside_steps", 0),
        "losses": [round(v, 5) for v in history["losses"]],
        "load_max_over_mean": history["load"],
        "router_scale_abs_mean": [round(m.router.scale.abs().mean().item(), 6) for m in mlps],
        "router_bias_abs_mean": [round(m.router.bias.abs().mean().item(), 6) for m in mlps],
    }
    report = _source_report(carved_dir)
    meta = report.pop("meta", {})
    report.pop("cmoe", None)
    if "finetune" in report:
        report.setdefault("finetune_history", []).append(report.pop("finetune"))
    report["finetune"] = record
    meta = {**meta, "finetune": {k: record[k] for k in ("created", "steps", "tokens", "seconds",
                                                        "loss_first", "loss_last")}}
    cmoe = {k: v for k, v in cmoe.items() if k != "cmoe_carve_version"}
    with atomic_directory(out, overwrite) as tmp:
        save_carved(model, tokenizer, tmp, cmoe, report, meta, overwrite=True)
        plot_losses(history["losses"], tmp / "loss_curve.png", title=f"cmoe finetune ({config.mode})")
        with open(tmp / "README.md", "a") as card:
            card.write(finetune_card(record))


def plot_losses(losses: list[float], path: Path, title: str = "") -> None:
    """Training loss per optimizer step (and a moving average) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="step loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.6, label=f"mean of {window}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _loss_description(c: dict) -> str:
    if not c.get("distill"):
        return "next-token cross-entropy"
    text = f"KL divergence from the dense teacher's logits, temperature {c['temperature']:g}"
    if c.get("distill_hidden"):
        text += f", plus {c['distill_hidden']:g} x per-layer hidden-state MSE"
    if c.get("distill_ce"):
        text += f", plus {c['distill_ce']:g} x next-token cross-entropy"
    return text


def finetune_card(record: dict) -> str:
    """The fine-tuning section appended to the model card."""
    c = record["config"]
    what = {
        "lora": f"LoRA r={c['lora_rank']}, alpha={c['lora_alpha']:g} on q/k/v/o"
                + (" and every expert's gate/up and down" if c.get("lora_experts", True) else "")
                + " (merged), plus the router scale u",
        "router": "the router scale u only",
        "full": "every weight, plus the router scale u",
    }[c["mode"]]
    lrs = f"router scale {c['router_lr']:g}" + (f", main {c['lr']:g}" if c["lr"] else "")
    load = record["load_max_over_mean"]
    lines = [
        "",
        "## Fine-tuning",
        "",
        "| | |",
        "|---|---|",
        f"| trained | {what} ({record['trainable_parameters']:,} parameters) |",
        f"| data | {record['data']['description']} |",
        f"| windows | {c['samples']} x {c['seqlen']} tokens, {c['epochs']} epoch(s), seed {c['seed']} |",
        (f"| steps | {record['steps']} of {c['batch_size']} x {c['grad_accum']} x "
         f"{record['processes']} window(s), {record['tokens']:,} tokens |"),
        (f"| optimizer | AdamW betas ({c['adam_beta1']}, {c['adam_beta2']}), lr {lrs}, "
         f"{c['schedule']} after {c['warmup_ratio']:g} warmup |"),
        f"| load balancing | selection-bias update, gamma {c['gamma']:g} per step |",
        f"| loss | {_loss_description(c)} |",
        (f"| training loss | {record['loss_first']:.3f} (first step) -> "
         f"{record['loss_last']:.3f} (mean of the last 10) |"),
        (f"| load max/mean | {load[0] if load else float('nan'):.2f} (first step) -> "
         f"{load[-1] if load else float('nan'):.2f} (last step), mean over layers |"),
        (f"| time | {record['seconds']:.0f} s on {record['device']}, precision "
         f"{record['mixed_precision']} |"),
        "",
        f"Loss curve: `loss_curve.png`; per-step losses in `{REPORT_FILE}` under `finetune`.",
    ]
    return "\n".join(lines) + "\n"
