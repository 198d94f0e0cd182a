"""`cmoe bench` on tiny models built from a config: what is measured, never how fast.

Timings on a shared CI machine mean nothing, so these tests check properties: every metric has
one sample per repetition for every model, the runs decode exactly the tokens asked for, the FFN
hooks see exactly the decode calls, the per-expert loop computes what the carved FFN computes and
is uninstalled afterwards, and the CLI writes a complete JSON report.
"""

import copy
import json

import pytest
import torch
import transformers
from tiny_models import COMMON, calib_ids, tiny_model
from typer.testing import CliRunner

from cmoe_carve import bench
from cmoe_carve.bench import BenchConfig, BenchError, BenchModel
from cmoe_carve.carve import CarveConfig, carve_model
from cmoe_carve.checkpoint import save_carved
from cmoe_carve.cli import app
from cmoe_kernels import cpu_decode

# Small runs: 1 thread (the CI machine has 2 cores, shared), 3 new tokens, 1 repetition.
FAST = {
    "prefill_tokens": (1, 8),  # 1: a lone token with an empty cache; 8: a short prompt
    "decode_batches": (1, 2),  # batch 1 gets the FFN hooks and the loop baseline, batch 2 not
    "prompt_tokens": 6,
    "new_tokens": 3,
    "repeats": 2,
    "warmup": 1,
    "threads": 1,
}


def carved_and_dense(family: str = "llama"):
    dense = tiny_model(family)
    carved = copy.deepcopy(dense)
    carve_model(carved, calib_ids(), CarveConfig(spec="S2A2E8", k_act=5), progress=False)
    return carved, dense


@pytest.fixture(scope="module")
def pair():
    return carved_and_dense()


@pytest.fixture(scope="module")
def report(pair):
    carved, dense = pair
    models = [BenchModel("carved", carved, "tiny carved"), BenchModel("dense", dense, "tiny dense")]
    return bench.run_bench(models, BenchConfig(**FAST), progress=False)


def test_every_metric_has_one_sample_per_repeat_for_both_models(report):
    assert report.labels == ["carved", "dense", bench.LOOP_LABEL]
    expected = {
        "decode_tokens_per_s.b1", "decode_tokens_per_s.b2", "ttft_ms.b1", "ttft_ms.b2",
        "ffn_us_per_layer.b1", "ffn_gb_per_s.b1", "ffn_share_pct.b1", "rest_ms_per_step.b1",
        "prefill_tokens_per_s.L1", "prefill_tokens_per_s.L8",
    }
    assert expected <= set(report.metrics)
    for key in expected:
        metric = report.metrics[key]
        for label in ("carved", "dense"):
            assert len(metric.samples[label]) == FAST["repeats"], (key, label)
            assert metric.median(label) > 0
        assert metric.ratio("carved", "dense") > 0
    # Only carved FFNs have a router, timed inside the FFN time. The fused CPU decode step
    # routes inside its one call (no router module runs): then only the loop's router is timed.
    router = report.metrics["router_us_per_layer.b1"]
    fused = cpu_decode.applies(torch.zeros(1, COMMON["hidden_size"]))
    assert set(router.samples) == ({bench.LOOP_LABEL} if fused else {"carved", bench.LOOP_LABEL})
    for label in router.samples:
        assert router.median(label) < report.metrics["ffn_us_per_layer.b1"].median(label)
    # The per-expert loop runs only where the FFN is timed: batch-1 decode.
    assert bench.LOOP_LABEL in report.metrics["ffn_us_per_layer.b1"].samples
    assert bench.LOOP_LABEL not in report.metrics["decode_tokens_per_s.b2"].samples
    assert bench.LOOP_LABEL not in report.metrics["prefill_tokens_per_s.L8"].samples


def test_ffn_share_and_rest_add_up_to_the_decode_step(report):
    for label in report.labels:
        share = report.metrics["ffn_share_pct.b1"].samples[label]
        assert all(0 < s < 100 for s in share)
    # A step is FFN time (all layers) plus the rest; check on the medians' orders of magnitude.
    ffn_ms = report.metrics["ffn_us_per_layer.b1"].median("dense") * 2 / 1e3  # 2 layers
    rest_ms = report.metrics["rest_ms_per_step.b1"].median("dense")
    assert ffn_ms > 0 and rest_ms > 0


def test_model_info_counts_the_bytes_a_token_reads(report, pair):
    carved, dense = report.models["carved"], report.models["dense"]
    assert dense["ffn_bytes_per_token_per_layer"] == 3 * 48 * 100 * 4  # gate, up, down in fp32
    # 4 of 8 experts (stack padded to 8 * 13 neurons) plus every router parameter.
    expert_bytes = 3 * 48 * 13 * 4
    router = next(m.router for m in pair[0].modules() if bench.is_carved_mlp(m))
    router_bytes = 4 * sum(p.numel() for p in router.parameters())
    assert carved["ffn_bytes_per_token_per_layer"] == 4 * expert_bytes + router_bytes
    assert "cmoe_kernels.carved_ffn" in carved["carved_ffn_backend"]
    assert dense["carved_ffn_backend"] is None and dense["ffn_layers"] == 2


def test_report_is_json_with_medians_and_ratios(report):
    record = json.loads(json.dumps(report.to_record()))
    assert record["options"]["new_tokens"] == FAST["new_tokens"]
    assert record["machine"]["torch_threads"] == 1  # the run's own setting, restored after
    metric = next(m for m in record["metrics"] if m["key"] == "ffn_us_per_layer.b1")
    assert set(metric["ratios"]) == {"carved/dense", "loop/carved"}
    samples = metric["samples"]["carved"]
    assert metric["median"]["carved"] == pytest.approx(sum(samples) / 2)  # 2 repeats


def test_threads_are_restored_after_the_run(pair):
    before = torch.get_num_threads()
    carved, _ = pair
    config = BenchConfig(**{**FAST, "decode_batches": (), "repeats": 1, "warmup": 0})
    bench.run_bench([BenchModel("carved", carved, "tiny")], config, progress=False)
    assert torch.get_num_threads() == before


def test_decode_makes_every_token_even_when_eos_comes_first(pair):
    _, dense = pair
    ids = bench.prompt_ids(None, COMMON["vocab_size"], 1, 6)
    with torch.no_grad():
        first = int(dense(ids).logits[0, -1].argmax())
    model = copy.deepcopy(dense)
    model.generation_config.eos_token_id = first  # greedy decoding would stop at once
    sample = bench.decode_once(model, ids, new_tokens=5)
    assert sample.steps == 4 and sample.decode_s > 0 and sample.ttft_s > 0


@pytest.mark.parametrize("batch", [1, 3])  # one token per step, and several
@pytest.mark.parametrize("backend", ["auto", "torch"])  # the fused CPU step, the general path
def test_ffn_hooks_time_exactly_the_decode_calls(pair, batch, backend, monkeypatch):
    monkeypatch.setenv("CMOE_KERNEL", backend)
    carved, _ = pair
    ids = bench.prompt_ids(None, COMMON["vocab_size"], batch, 6)
    ffn = bench.ffn_modules(carved)
    sample = bench.decode_once(carved, ids, new_tokens=4, ffn=ffn)
    assert len(ffn) == 2
    assert sample.ffn_calls == 2 * 3  # 2 layers x 3 decode steps; the prefill is not counted
    if cpu_decode.applies(ids.new_zeros(1, 1, dtype=torch.float32)):
        assert sample.router_calls == 0  # routed inside the fused call: no router module runs
    else:
        assert sample.router_calls == 2 * 3 and 0 < sample.router_s < sample.ffn_s
    assert 0 < sample.ffn_s < sample.decode_s
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in ffn)


def test_per_expert_loop_computes_the_carved_ffn_and_is_uninstalled(pair):
    carved, _ = pair
    ids = calib_ids(1, 12, seed=4)
    with torch.no_grad():
        ours = carved(ids).logits
        with bench.per_expert_loop_installed(carved):
            assert all("experts" in m.__dict__ for m in carved.modules() if bench.is_carved_mlp(m))
            loop = carved(ids).logits
    torch.testing.assert_close(loop, ours, rtol=1e-5, atol=1e-5)
    assert not any("experts" in m.__dict__ for m in carved.modules())


def test_gemma_carved_model_runs_with_the_loop_baseline():
    carved, dense = carved_and_dense("gemma3")  # GELU-tanh experts, another decoder layout
    config = BenchConfig(
        **{**FAST, "prefill_tokens": (4,), "decode_batches": (1,), "repeats": 1, "warmup": 0}
    )
    report = bench.run_bench(
        [BenchModel("carved", carved, "c"), BenchModel("dense", dense, "d")], config, progress=False
    )
    assert set(report.metrics["ffn_us_per_layer.b1"].samples) == {"carved", "dense", "loop"}


def test_prompts_come_from_text_with_a_tokenizer_and_stay_in_the_vocabulary():
    tokenizer = tiny_tokenizer()
    ids = bench.prompt_ids(tokenizer, 200, 3, 50)
    assert ids.shape == (3, 50) and int(ids.max()) < 200
    assert not torch.equal(ids[0], ids[1])  # consecutive windows, not one prompt three times
    random_ids = bench.prompt_ids(None, 64, 2, 5, seed=1)
    assert random_ids.shape == (2, 5)
    assert torch.equal(random_ids, bench.prompt_ids(None, 64, 2, 5, seed=1))  # seeded


@pytest.mark.parametrize(
    "options, field",
    [
        ({"new_tokens": 1}, "--new-tokens"),  # no decode step left after the first token
        ({"prompt_tokens": 1}, "--prompt-tokens"),  # prefill would look like a decode step
        ({"prefill_tokens": (0,)}, "--tokens"),
        ({"decode_batches": (2, -1)}, "--batch"),
        ({"repeats": 0}, "--repeats"),
        ({"threads": 0}, "--threads"),
        ({"prefill_tokens": (), "decode_batches": ()}, "nothing to measure"),
    ],
)
def test_bad_options_name_the_option(options, field):
    with pytest.raises(BenchError, match=field):
        BenchConfig(**options)


def test_models_that_cannot_be_compared_are_refused(pair):
    carved, _ = pair
    other = tiny_model("llama")
    other.config.vocab_size = 300
    with pytest.raises(BenchError, match="different vocabularies"):
        bench.run_bench(
            [BenchModel("carved", carved, "c"), BenchModel("dense", other, "d")],
            BenchConfig(**FAST), progress=False,
        )
    too_long = BenchConfig(**{**FAST, "prefill_tokens": (COMMON["max_position_embeddings"] + 1,)})
    with pytest.raises(BenchError, match="lower --tokens"):
        bench.run_bench([BenchModel("carved", carved, "c")], too_long, progress=False)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(BenchError, match="no gated or carved MLP"):
        bench.ffn_modules(gpt2)


# ----------------------------------------------------------------------------------------------
# The command, on checkpoints written to disk


def tiny_tokenizer():
    """A word-level tokenizer over 256 ids, made offline (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(254)} | {"<unk>": 254, "</s>": 255}
    for i, word in enumerate(["the", "of", "and", "in", "to", "a", "is", "was"]):
        vocab[word] = vocab.pop(f"w{i}")
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    dense = tiny_model("llama")
    tokenizer = tiny_tokenizer()
    dense.save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    result = carve_model(dense, calib_ids(), CarveConfig(spec="S2A2E8", k_act=5), progress=False)
    meta = {"source_model": "tiny"}
    save_carved(dense, tokenizer, root / "carved", result.cmoe, {"layers": []}, meta)
    return root


def test_cli_bench_prints_tables_and_writes_json(checkpoints, tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", str(checkpoints / "carved"), "--compare", str(checkpoints / "dense"),
            "--tokens", "1,8", "--batch", "1", "--prompt-tokens", "6", "--new-tokens", "3",
            "--repeats", "1", "--warmup", "0", "--threads", "1", "--json", str(out),
            "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "carved/dense" in result.output and "per-expert loop" in result.output
    record = json.loads(out.read_text())
    assert record["primary"] == "carved" and record["reference"] == "dense"
    assert record["models"]["carved"]["spec"] == "S2A2E8"
    keys = {m["key"] for m in record["metrics"]}
    assert {"decode_tokens_per_s.b1", "prefill_tokens_per_s.L8", "ffn_us_per_layer.b1"} <= keys


def test_cli_bench_bad_option_is_one_line_and_exit_2(checkpoints):
    result = CliRunner().invoke(app, ["bench", str(checkpoints / "carved"), "--tokens", "1,x"])
    assert result.exit_code == 2
    assert "--tokens takes comma-separated integers" in result.output
    assert "Traceback" not in result.output
