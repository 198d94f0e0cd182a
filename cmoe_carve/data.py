"""Text for calibration and evaluation, and the token windows cut from it.

`resolve_text` turns a dataset name (`wikitext2`, `c4`) or a file path into a `TextSource`: the
exact text, and where it came from. Named datasets are looked for, in order,
  1. in a local data directory (`data_dir`, else `$CMOE_DATA_DIR`) laid out like `shared/data`:
     `wikitext-2-raw/wiki.{train,valid,test}.raw`, `c4/*.jsonl` (or `.json`, `.json.gz`, ...);
  2. on the Hugging Face hub through `datasets` (skipped within seconds when it is unreachable);
  3. for WikiText-2 calibration only, in the excerpt shipped in `cmoe_carve/data_files/`.
Every fallback is logged as a warning naming the text actually used; one dataset is never
substituted for another, and an evaluation split is never used for calibration (a file path
given explicitly is the exception: the user named it).

The text follows the GPTQ protocol (the one CMoE's code uses): WikiText-2 rows joined with
"\\n\\n"; C4 documents joined with " ", the first 1,100 documents of the validation shard for
evaluation. `calibration_windows` and `eval_windows` (in `text_windows`) tokenise that text once
and cut windows.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import logging
import os
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from .errors import DataError
# The windows live in text_windows; their names stay importable from here.
from .text_windows import (  # noqa: F401
    C4_EVAL_MAX_WINDOWS,
    _require_one_window,
    calibration_windows,
    eval_windows,
    require_within_context,
    tokenize_text,
)

logger = logging.getLogger(__name__)

Purpose = Literal["calibration", "evaluation"]
DatasetName = Literal["wikitext2", "c4", "file"]

DATASETS = ("wikitext2", "c4")
DATA_DIR_ENV = "CMOE_DATA_DIR"

WIKITEXT_HUB = ("wikitext", "wikitext-2-raw-v1")
C4_HUB = "allenai/c4"
C4_HUB_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
# GPTQ's C4 protocol: the first 1,100 validation documents (at most 256 windows of them:
# text_windows.C4_EVAL_MAX_WINDOWS).
C4_EVAL_DOCUMENTS = 1100
# The first 1,000 train documents: the same text as the sample in shared/data/c4, so a hub and a
# local run calibrate on identical text. About 2.3 MB, 550k SmolLM2 tokens (268 windows of 2,048).
C4_CALIBRATION_DOCUMENTS = 1000
# Seconds to wait for the hub to answer before falling back; DNS can hang, so this bounds it too.
HUB_PROBE_TIMEOUT_S = 5.0

PACKAGE_EXCERPT_ORIGIN = "package:cmoe_carve/data_files/wikitext2_valid_excerpt.txt"
PACKAGE_EXCERPT_NOTE = (
    "WikiText-2 excerpt shipped with cmoe-carve: bytes 0-123,759 of the validation split "
    "wiki.valid.raw (CC BY-SA 3.0, see cmoe_carve/data_files/ATTRIBUTION.md)"
)

_WIKI_SPLIT_FILES = {
    "train": "wiki.train.raw",
    "validation": "wiki.valid.raw",
    "test": "wiki.test.raw",
}
_WIKI_FILE_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
_JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_EVAL_SPLIT = {"wikitext2": "test", "c4": "validation"}


@dataclass(frozen=True)
class TextSource:
    """A text and exactly where it came from; `to_record()` goes into checkpoints and reports."""

    text: str
    dataset: DatasetName
    split: str | None  # "train", "validation", "test", or None for a file of unknown split
    origin: str  # a file path, "hub:wikitext/wikitext-2-raw-v1", or "package:cmoe_carve/..."
    note: str = ""  # why this text rather than the one asked for; empty when nothing fell back

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()  # ~3 ms per MB

    def describe(self) -> str:
        split = f" {self.split} split" if self.split else ""
        note = f" [{self.note}]" if self.note else ""
        return f"{self.dataset}{split} from {self.origin} ({len(self.text):,} chars){note}"

    def to_record(self) -> dict:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "origin": self.origin,
            "sha256": self.sha256,
            "n_chars": len(self.text),
            "note": self.note,
        }


# ----------------------------------------------------------------------------------------------
# Resolving a name or a path to a text


def resolve_text(name_or_path: str, *, purpose: Purpose, data_dir: str | None = None) -> TextSource:
    """The text for `purpose` named by `name_or_path`: `wikitext2`, `c4`, or a file path.

    Files: plain text (`.txt` and anything unrecognised, read as is), WikiText raw (`.raw`: rows
    joined with "\\n\\n"), JSON lines with a `text` field (`.jsonl`, `.json`, optionally `.gz`) and
    parquet with a `text` column, documents joined with " ". A file named like the WikiText-2 or
    C4 releases (`wiki.test.raw`, `c4-validation.00000-of-00008.json.gz`) is labelled as that
    dataset and split and read the way the protocol reads it.
    """
    if purpose not in ("calibration", "evaluation"):
        raise ValueError(f"purpose must be 'calibration' or 'evaluation', not {purpose!r}")
    key = name_or_path.strip().lower().replace("-", "")
    if key in DATASETS:
        return _resolve_named(key, purpose, data_dir)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _source_from_file(path, purpose)
    if path.is_dir():
        raise DataError(
            f"{name_or_path} is a directory: pass it as --data-dir (laid out as "
            "wikitext-2-raw/wiki.*.raw, c4/*.jsonl) and name the dataset, or pass a file"
        )
    raise DataError(
        f"no dataset or file named {name_or_path!r}: use wikitext2, c4, or the path of a text, "
        "JSON lines or parquet file"
    )


def _resolve_named(name: str, purpose: Purpose, data_dir: str | None) -> TextSource:
    tried: list[str] = []  # one phrase per place looked in, for the error message
    local = _local_data_dir(data_dir)
    if local is not None:
        find = _local_wikitext if name == "wikitext2" else _local_c4
        source = find(local, purpose, tried)
        if source is not None:
            return source
    else:
        tried.append(f"no local data directory (--data-dir or ${DATA_DIR_ENV})")
    source = _hub_text(name, purpose, tried)
    if source is not None:
        return source
    if name == "wikitext2" and purpose == "calibration":
        return _packaged_excerpt(tried)
    layout = "wikitext-2-raw/wiki.test.raw" if name == "wikitext2" else "c4/*.jsonl or c4/*.json.gz"
    split = _EVAL_SPLIT[name] if purpose == "evaluation" else "train"
    raise DataError(
        f"{name} ({split} split, for {purpose}) not found: {'; '.join(tried)}. Supply it with "
        f"--data-dir DIR or ${DATA_DIR_ENV} (holding {layout}), a file path instead of the name, "
        "or internet access to the Hugging Face hub"
    )


def _local_data_dir(data_dir: str | None) -> Path | None:
    given = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if given is None:
        return None
    path = Path(given).expanduser()
    if not path.is_dir():
        where = "--data-dir" if data_dir is not None else f"${DATA_DIR_ENV}"
        raise DataError(
            f"data directory {given} ({where}) does not exist: fix the path or unset it"
        )
    return path


# ----------------------------------------------------------------------------------------------
# Local data directory


def _local_wikitext(root: Path, purpose: Purpose, tried: list[str]) -> TextSource | None:
    folder = root / "wikitext-2-raw"
    if purpose == "evaluation":
        path = folder / _WIKI_SPLIT_FILES["test"]
        if path.is_file():
            return _wikitext_file_source(path, "test")
        tried.append(f"no {path}")
        return None
    train = folder / _WIKI_SPLIT_FILES["train"]
    if train.is_file():
        return _wikitext_file_source(train, "train")
    valid = folder / _WIKI_SPLIT_FILES["validation"]
    if valid.is_file():
        note = f"train split {train} not found; calibrating on the validation split instead"
        logger.warning("wikitext2: %s (%s)", note, valid)
        return _wikitext_file_source(valid, "validation", note=note)
    tried.append(f"no {train} or {valid.name}")
    if (folder / _WIKI_SPLIT_FILES["test"]).is_file():
        # Calibrating on the split that perplexity is measured on would flatter the figure.
        tried.append("wiki.test.raw is the evaluation split and is never used for calibration")
    return None


def _local_c4(root: Path, purpose: Purpose, tried: list[str]) -> TextSource | None:
    folder = root / "c4"
    files = sorted(p for p in folder.glob("*") if p.is_file() and _is_json_lines(p))
    by_split: dict[str | None, list[Path]] = {}
    for path in files:
        by_split.setdefault(_c4_split_of(path.name), []).append(path)
    if not files:
        tried.append(f"no {folder}/*.jsonl or *.json.gz")
        return None
    wanted, fallbacks = (
        ("validation", ["train", None]) if purpose == "evaluation" else ("train", [None])
    )
    if by_split.get(wanted):
        return _c4_file_source(by_split[wanted][0], purpose, wanted)
    for split in fallbacks:
        if by_split.get(split):
            path = by_split[split][0]
            label = f"the {split} split" if split else "a file of unknown split"
            note = f"no C4 {wanted} file in {folder}; using {label}"
            if purpose == "evaluation" and split == "train":
                note += ", not the GPTQ C4 validation protocol"
            logger.warning("c4: %s: %s", note, path)
            return _c4_file_source(path, purpose, split, note=note)
    tried.append(f"no C4 {wanted} file in {folder}")
    if purpose == "calibration" and by_split.get("validation"):
        tried.append("C4 validation is the evaluation split and is never used for calibration")
    return None


def _c4_split_of(filename: str) -> str | None:
    name = filename.lower()
    if "validation" in name:
        return "validation"
    return "train" if "train" in name else None


def _wikitext_file_source(path: Path, split: str, note: str = "") -> TextSource:
    text = "\n\n".join(wikitext_rows(_read_utf8(path)))
    logger.info("wikitext2 %s split: %s", split, path)
    return TextSource(text, "wikitext2", split, str(path), note)


def _c4_file_source(path: Path, purpose: Purpose, split: str | None, note: str = "") -> TextSource:
    limit = C4_EVAL_DOCUMENTS if purpose == "evaluation" else C4_CALIBRATION_DOCUMENTS
    documents = _read_documents(path, limit)
    logger.info("c4 %s split: first %d documents of %s", split or "unknown", len(documents), path)
    return TextSource(" ".join(documents), "c4", split, str(path), note)


# ----------------------------------------------------------------------------------------------
# Explicit files


def _source_from_file(path: Path, purpose: Purpose) -> TextSource:
    name = path.name.lower()
    wiki = re.fullmatch(r"wiki\.(train|valid|test)\.raw", name)
    if wiki and "103" not in path.parent.name:  # WikiText-103 uses the same file names
        split = _WIKI_FILE_SPLITS[wiki.group(1)]
        _warn_if_eval_split("wikitext2", split, purpose, path)
        return _wikitext_file_source(path, split)
    if name.startswith("c4-") and _is_json_lines(path):
        split = _c4_split_of(name)
        _warn_if_eval_split("c4", split, purpose, path)
        return _c4_file_source(path, purpose, split)
    if name.endswith(".raw"):
        text = "\n\n".join(wikitext_rows(_read_utf8(path)))
    elif _is_json_lines(path) or name.endswith(".parquet"):
        text = " ".join(_read_documents(path, None))
    else:
        text = _read_utf8(path)
    if not text.strip():
        raise DataError(f"{path} holds no text: pass a file with text in it")
    return TextSource(text, "file", None, str(path))


def _warn_if_eval_split(dataset: str, split: str | None, purpose: Purpose, path: Path) -> None:
    if purpose == "calibration" and split == _EVAL_SPLIT[dataset]:
        logger.warning(
            "%s: calibrating on %s, the %s evaluation split, because it was named explicitly; "
            "perplexity measured on it will be optimistic",
            dataset,
            path,
            split,
        )


def _is_json_lines(path: Path) -> bool:
    return path.name.lower().endswith(_JSON_SUFFIXES)


def _read_utf8(path: Path) -> str:
    try:
        # Text mode: universal newlines, as the HF WikiText loader reads the raw files.
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): convert it"
        ) from None


def _read_documents(path: Path, limit: int | None) -> list[str]:
    """The `text` field of the first `limit` records of a JSON lines, JSON or parquet file."""
    if path.name.lower().endswith(".parquet"):
        return _read_parquet(path, limit)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            head = f.read(1)
            while head.isspace():
                head = f.read(1)
            f.seek(0)
            if head == "[":  # a JSON array rather than one record per line
                records = json.load(f)[:limit]
                return [_text_field(r, path, i + 1) for i, r in enumerate(records)]
            documents = []
            for lineno, line in enumerate(f, start=1):
                if limit is not None and len(documents) >= limit:
                    break
                if line.strip():
                    documents.append(_text_field(json.loads(line), path, lineno))
    except (json.JSONDecodeError, UnicodeDecodeError, gzip.BadGzipFile, EOFError) as err:
        raise DataError(
            f"{path} is not readable JSON lines ({err}): one JSON object per line"
        ) from None
    if not documents:
        raise DataError(f"{path} holds no records: pass a file with one JSON object per line")
    return documents


def _text_field(record, path: Path, where: int) -> str:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    found = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"{path} record {where} has no string 'text' field (found {found}): add one")


def _read_parquet(path: Path, limit: int | None) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["text"])
    except (KeyError, ValueError) as err:  # pyarrow raises one of these for a missing column
        raise DataError(
            f"{path} has no 'text' column ({err}): name the text column 'text'"
        ) from None
    texts = table.column("text").to_pylist()[:limit]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise DataError(f"{path}: the 'text' column must hold strings, one document per row")
    return texts


def wikitext_rows(raw_text: str) -> list[str]:
    """The rows the HF `wikitext` dataset yields for a raw file: every line with its "\\n" kept,
    blank (whitespace-only) lines as "". Its loader does `for row in open(f): yield row if
    row.strip() else ""`; io.StringIO with newline=None splits lines the same way (on \\n, \\r\\n
    and \\r, translated to \\n), unlike str.splitlines, which also splits on \\x0b, \\u2028...
    """
    return [row if row.strip() else "" for row in io.StringIO(raw_text, newline=None)]


# ----------------------------------------------------------------------------------------------
# Hugging Face hub and the packaged excerpt


def _hub_text(name: str, purpose: Purpose, tried: list[str]) -> TextSource | None:
    offline = _hub_offline()
    if offline:
        # Offline mode: `datasets` still serves its cache, and fails at once when it has nothing.
        logger.info("%s is set: trying the local datasets cache only", offline)
    else:
        unreachable = _hub_unreachable()
        if unreachable:
            tried.append(f"hub: {unreachable}")
            logger.info("hugging face hub skipped: %s", unreachable)
            return None
    try:
        import datasets
    except ImportError:
        tried.append("hub: the `datasets` package is not installed")
        return None
    split = _EVAL_SPLIT[name] if purpose == "evaluation" else "train"
    try:
        if name == "wikitext2":
            rows = datasets.load_dataset(*WIKITEXT_HUB, split=split)["text"]
            text, origin = "\n\n".join(rows), f"hub:{'/'.join(WIKITEXT_HUB)}"
        else:
            limit = C4_EVAL_DOCUMENTS if purpose == "evaluation" else C4_CALIBRATION_DOCUMENTS
            stream = datasets.load_dataset(
                C4_HUB, data_files={split: C4_HUB_FILES[split]}, split=split, streaming=True
            )
            documents = [row["text"] for row in itertools.islice(stream, limit)]
            text, origin = " ".join(documents), f"hub:{C4_HUB}/{C4_HUB_FILES[split]}"
    except Exception as err:  # noqa: BLE001 - datasets raises many types; each means "not here"
        reason = str(err).splitlines()[0] if str(err) else ""
        tried.append(f"hub: {type(err).__name__}: {reason}")
        logger.warning("%s from the hub failed: %s: %s", name, type(err).__name__, reason)
        return None
    logger.info("%s %s split from %s", name, split, origin)
    return TextSource(text, name, split, origin)


def _hub_offline() -> str | None:
    """The name of the environment variable that puts the hub offline, if one is set."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


_PROBED: dict[str, str | None] = {}  # endpoint -> why unreachable; probed once per process


def _hub_unreachable() -> str | None:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _PROBED:
        _PROBED[endpoint] = _probe_hub()
    return _PROBED[endpoint]


def _probe_hub(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when the hub answers within `timeout` seconds, else why not.

    urllib honours the *_PROXY variables; the request runs in a daemon thread because DNS lookups
    ignore socket timeouts and can hang far longer than `timeout`."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    result: list[str | None] = []

    def attempt() -> None:
        try:
            request = urllib.request.Request(f"{endpoint}/api/datasets/wikitext", method="HEAD")
            urllib.request.urlopen(request, timeout=timeout).close()
            result.append(None)
        except urllib.error.HTTPError as err:
            # Not the hub's answer for a public dataset: a proxy or firewall answering for it.
            result.append(f"{endpoint} answered HTTP {err.code} for a public dataset")
        except (OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            result.append(
                f"{urllib.parse.urlsplit(endpoint).netloc or endpoint} unreachable ({reason})"
            )

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return result[0] if result else f"no answer from {endpoint} within {timeout:.0f} s"


def _packaged_excerpt(tried: list[str]) -> TextSource:
    from . import data_files

    raw = (
        resources.files(data_files)
        .joinpath(data_files.WIKITEXT2_EXCERPT)
        .read_text(encoding="utf-8")
    )
    note = f"{PACKAGE_EXCERPT_NOTE}; no WikiText-2 train split was found locally or on the hub"
    logger.warning(
        "wikitext2: calibrating on the %s, because no WikiText-2 train split was found (%s). "
        "For the full text pass --data-dir, set $%s, or allow hub access",
        PACKAGE_EXCERPT_NOTE,
        "; ".join(tried),
        DATA_DIR_ENV,
    )
    text = "\n\n".join(wikitext_rows(raw))
    return TextSource(text, "wikitext2", "validation", PACKAGE_EXCERPT_ORIGIN, note)
