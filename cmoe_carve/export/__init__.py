"""`cmoe export`: a carved checkpoint as files that engines run without this project's code.

One module per target (hf_glm4moe.py, gguf_glm4moe.py) maps a shared, target-neutral
description of the carved layers (layers.py). rewrite.py decides what each feature of the
checkpoint becomes (exact rewrite, measured approximation, or an error); fidelity.py measures
the result against the carved model on check tokens. Outputs are written to a temporary path
and renamed into place only after they loaded and were measured.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..checkpoint import REPORT_FILE, atomic_directory, load_carved, read_carved_config
from ..errors import CheckpointError
from . import fidelity, rewrite
from .layers import describe

log = logging.getLogger(__name__)

FORMATS = ("hf", "gguf")
REPORT = "export_report.json"
# Files of a carved checkpoint that an hf export does not copy (it writes its own).
_NOT_COPIED = {"config.json", "model.safetensors", "modeling_cmoe.py", "README.md", REPORT_FILE}


def check_tokens(carved: Path, n: int, config) -> tuple[torch.Tensor | None, str]:
    """The tokens every comparison runs on: the packaged WikiText-2 excerpt through the
    checkpoint's tokenizer, or seeded random ids when the checkpoint has none."""
    if n <= 0:
        return None, "none"
    from importlib import resources

    from .. import data_files

    try:
        from transformers import AutoTokenizer

        # The loaded config: the checkpoint's auto_map names modeling code, not a tokenizer.
        tok = AutoTokenizer.from_pretrained(str(carved), trust_remote_code=False, config=config)
    except Exception:  # noqa: BLE001 - no tokenizer saved (tiny test models): random ids
        tok = None
    if tok is None:
        ids = torch.randint(0, config.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
        return ids, f"{n} random token ids (seed 0; the checkpoint has no tokenizer)"
    text = resources.files(data_files).joinpath(data_files.WIKITEXT2_EXCERPT).read_text(encoding="utf-8")
    ids = torch.tensor(tok(text)["input_ids"][:n])
    return ids, f"first {ids.numel()} tokens of the packaged WikiText-2 validation excerpt"


def source_gguf(carved: Path) -> Path | None:
    """The GGUF file the carve started from, if any (a gguf export copies its tokenizer)."""
    try:
        meta = json.loads((carved / REPORT_FILE).read_text()).get("meta", {})
    except (OSError, json.JSONDecodeError):
        return None
    ref = meta.get("source_ref")
    if not ref:
        return None
    ref = Path(ref)
    if ref.suffix.lower() == ".gguf" and ref.is_file():
        return ref
    done = ref / "DONE"  # a GGUF dequantized by loading.dequantize_gguf records its origin
    if done.is_file():
        path = Path(done.read_text().strip())
        return path if path.is_file() else None
    return None


def export(
    carved: str | Path,
    fmt: str,
    out: str | Path,
    *,
    quant: str = "f32",
    approximate: bool = False,
    check: int = 256,
    eps: float | None = None,
    tokenizer_gguf: str | Path | None = None,
    hf_tokenizer: bool = False,
    overwrite: bool = False,
    ids: torch.Tensor | None = None,
    echo=print,
) -> dict:
    """Export `carved` as `fmt` to `out`; returns the report (also written next to the output)."""
    from .gguf_glm4moe import QUANTS

    carved, out = Path(carved), Path(out)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown --format {fmt!r}: use hf or gguf")
    if quant not in QUANTS:
        raise CheckpointError(f"unknown --quant {quant!r}: use one of {', '.join(QUANTS)}")
    if fmt == "hf" and quant != "f32":
        raise CheckpointError("--quant applies to --format gguf; the hf export is float32")
    rewrite.check_config(read_carved_config(carved))
    if not approximate:  # refuse before minutes of loading
        rewrite.require_allowed(
            [rewrite.Note(f, "approximate", "") for f in rewrite.lossy_features(carved)], False
        )
    if fmt == "gguf":
        if out.is_dir():
            raise CheckpointError(f"--out {out} is a directory: pass a file path such as model.gguf")
        if out.exists() and not overwrite:
            raise CheckpointError(f"{out} already exists: choose another --out or pass --overwrite")
    tokenizer = _gguf_tokenizer(carved, tokenizer_gguf, hf_tokenizer) if fmt == "gguf" else None

    model = load_carved(carved)
    notes = rewrite.check_source(model) + rewrite.check_routing(model, approximate)
    rewrite.require_allowed(notes, approximate)
    if ids is None:
        ids, ids_note = check_tokens(carved, check, model.config)
    else:
        ids_note = f"{ids.numel()} given token ids"
    report: dict = {
        "source": str(carved), "format": fmt, "check_tokens": ids_note,
        "notes": rewrite.notes_record(notes),
    }
    for note in notes:
        echo(f"{note.line()}")
    if any(n.handling == "approximate" for n in notes):
        original = copy.deepcopy(model)
        rewrite.make_expressible(model, notes, ids)
        if ids is not None:
            effect = fidelity.approximation_effect(original, model, ids)
            report["approximation_effect"] = effect.record()
            echo(f"approximations, carved -> approximated carve: {effect.summary()}")
        del original
    native = describe(model)
    reference = fidelity.carved_run(model, ids) if ids is not None else None
    if fmt == "hf":
        report.update(_export_hf(model, native, carved, out, eps, reference, ids, overwrite, report, echo))
    else:
        report.update(_export_gguf(native, carved, out, quant, tokenizer, reference, ids, report, echo))
    return report


def _export_hf(model, native, carved, out, eps, reference, ids, overwrite, report, echo) -> dict:
    from transformers import AutoModelForCausalLM

    from .hf_glm4moe import DEFAULT_EPS, router_modules, routing_of, write_hf

    eps = DEFAULT_EPS if eps is None else eps
    result: dict = {"architecture": "glm4_moe (Glm4MoeForCausalLM)", "router_eps": eps}
    with atomic_directory(out, overwrite) as tmp:
        write_hf(native, tmp, eps)
        for f in carved.iterdir():
            if f.is_file() and f.name not in _NOT_COPIED:
                shutil.copy2(f, tmp / f.name)  # tokenizer, generation config
        if reference is not None:
            exported = AutoModelForCausalLM.from_pretrained(str(tmp), trust_remote_code=False).eval()
            hooks = routing_of(exported)
            try:
                with torch.no_grad():
                    logits = exported(ids[None]).logits[0].float()
            finally:
                for h in hooks["handles"]:
                    h.remove()
            fid = fidelity.compare_logits(reference[0], logits, ids)
            layers = [hooks["seen"][i] for i in range(len(native.layers))]
            real = native.num_experts - native.num_zero_experts
            fid.selection_agreement, fid.worst_gate_error = fidelity.selection_stats(reference[1], layers, real)
            with torch.no_grad():
                isolated = [r(x)[1:][::-1] for r, x in zip(router_modules(exported), reference[2])]
            fid.isolated_selection_agreement, fid.isolated_worst_gate_error = fidelity.selection_stats(
                reference[1], isolated, real
            )
            result["fidelity"] = fid.record()
            echo(f"hf export vs carved (transformers, no remote code): {fid.summary()}")
        (tmp / REPORT).write_text(json.dumps({**report, **result}, indent=2))
        (tmp / "README.md").write_text(_card(report, result))
    echo(f"wrote {out}")
    return result


def _gguf_tokenizer(carved: Path, tokenizer_gguf, hf_tokenizer: bool):
    """What the GGUF file's tokenizer comes from, decided (and converted) before any loading:
    --tokenizer-gguf, else the carve's source GGUF, else the checkpoint's Hugging Face
    tokenizer (converted; --hf-tokenizer prefers it to a source GGUF), else none."""
    from . import gguf_tokenizer

    if tokenizer_gguf and hf_tokenizer:
        raise CheckpointError("--tokenizer-gguf and --hf-tokenizer exclude each other: pass one")
    if tokenizer_gguf:
        path = Path(tokenizer_gguf)
        if not path.is_file():
            raise CheckpointError(f"--tokenizer-gguf {path} does not exist: check the path")
        return path
    if not hf_tokenizer and (src := source_gguf(carved)) is not None:
        return src
    if not hf_tokenizer and not (carved / "tokenizer.json").is_file():
        return None
    values = read_carved_config(carved)
    return gguf_tokenizer.from_hf(carved, int(values["vocab_size"]), _config(carved))


def _config(carved: Path):
    from ..checkpoint import carved_classes

    config_cls, _ = carved_classes(read_carved_config(carved)["cmoe"])
    return config_cls.from_pretrained(str(carved))


def _export_gguf(native, carved, out, quant, tokenizer, reference, ids, report, echo) -> dict:
    from . import gguf_tokenizer
    from .gguf_glm4moe import write_gguf

    result: dict = {"architecture": "glm4moe (llama.cpp)", "quant": quant}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        notes = "; ".join(f"{n['feature']}: {n['handling']}" for n in report["notes"]) or "none"
        extra = {"cmoe.export.notes": notes, "cmoe.export.source": str(carved)}
        if "approximation_effect" in report:
            extra["cmoe.export.approximation_effect"] = json.dumps(report["approximation_effect"])
        name = native.config.cmoe.get("spec", "carved")
        result["tokenizer"] = write_gguf(native, tmp, quant, tokenizer, f"cmoe-{name}", extra)
        if tokenizer is not None:
            result["tokenizer_check"] = gguf_tokenizer.verify(tmp, carved, tokenizer, native.config, echo)
        if reference is not None:
            logits = fidelity.llama_cpp_logits(tmp, ids)
            if logits is None:
                result["fidelity"] = "not measured: llama-cpp-python is not installed"
                echo("gguf export not checked through llama.cpp: install llama-cpp-python")
            else:
                fid = fidelity.compare_logits(reference[0], logits, ids)
                result["fidelity"] = fid.record()
                echo(f"gguf export ({quant}) vs carved (llama.cpp): {fid.summary()}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a written file gets the usual mode
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps({**report, **result}, indent=2))
    echo(f"wrote {out} (report: {out.name}.json)")
    return result


def _card(report: dict, result: dict) -> str:
    lines = [
        "---", "library_name: transformers", "tags: [cmoe, mixture-of-experts, glm4_moe]", "---",
        "# A carved (CMoE) model exported as a native glm4_moe checkpoint", "",
        f"Exported by `cmoe export` from `{report['source']}`. Loads with "
        "`AutoModelForCausalLM.from_pretrained(DIR)`: no remote code.", "",
        "What the export did with each feature of the carved model:", "",
    ]
    lines += [f"- {n['feature']}: {n['handling']} ({n['detail']})" for n in report["notes"]] or ["- nothing to rewrite: exact"]
    if "fidelity" in result:
        lines += ["", f"Measured against the carved model ({report['check_tokens']}): "
                  f"`{json.dumps(result['fidelity'])}`"]
    if "approximation_effect" in report:
        lines += ["", f"Effect of the approximations: `{json.dumps(report['approximation_effect'])}`"]
    return "\n".join(lines) + "\n"
