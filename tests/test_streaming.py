"""Layer streaming: carving one decoder layer at a time gives the same checkpoint as carving the
whole loaded model, from single-file and sharded sources, written as one file or as shards."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from cmoe_carve.carve import CarveConfig
from cmoe_carve.errors import ModelError
from cmoe_carve.loading import load_model
from cmoe_carve.pipeline import carve
from cmoe_carve.shards import INDEX_FILE, ShardWriter
from cmoe_carve.streaming import CheckpointTensors, decide_streaming
from tiny_models import FAMILIES, byte_tokenizer, calib_ids, tiny_model

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 40
ARGS = dict(calib_samples=3, seqlen=24, progress=False)


def _tensors(path):
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _dense(tmp_path, family, tied=False, shard=None):
    model = tiny_model(family)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    path = tmp_path / "dense"
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    byte_tokenizer().save_pretrained(path)
    (tmp_path / "text.txt").write_text(TEXT)
    return path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streamed_carve_equals_the_whole_model_carve(family, tmp_path):
    dense = _dense(tmp_path, family)
    common = dict(calib=str(tmp_path / "text.txt"), config=CarveConfig(spec="S2A2E8", k_act=5), **ARGS)
    carve(str(dense), tmp_path / "whole", stream="off", **common)
    carve(str(dense), tmp_path / "streamed", stream="on", **common)
    whole, streamed = _tensors(tmp_path / "whole"), _tensors(tmp_path / "streamed")
    assert sorted(streamed) == sorted(whole)
    for name in whole:
        assert torch.equal(streamed[name], whole[name]), name
    a = json.loads((tmp_path / "whole" / "config.json").read_text())
    b = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert b == a
    report = json.loads((tmp_path / "streamed" / "carve_report.json").read_text())
    assert report["meta"]["streamed"] is True
    ids = calib_ids(1, 16)
    with torch.no_grad():
        ref = load_model(str(tmp_path / "whole")).model(ids).logits
        got = load_model(str(tmp_path / "streamed")).model(ids).logits
    assert torch.equal(got, ref)


def test_streaming_reads_sharded_sources_and_writes_shards_with_tied_embeddings(tmp_path):
    dense = _dense(tmp_path, "llama", tied=True, shard="20KB")
    assert (dense / INDEX_FILE).is_file()  # the source really is sharded
    common = dict(calib=str(tmp_path / "text.txt"), config=CarveConfig(spec="S2A2E8", k_act=5), **ARGS)
    carve(str(dense), tmp_path / "whole", stream="off", **common)
    carve(str(dense), tmp_path / "streamed", stream="on", shard_bytes=30_000, **common)
    out = tmp_path / "streamed"
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert not list(out.glob(".shard-*"))  # no provisional file left
    whole, streamed = _tensors(tmp_path / "whole"), _tensors(out)
    assert "lm_head.weight" not in streamed  # tied: written once, as save_pretrained does
    assert sorted(streamed) == sorted(whole)
    assert all(torch.equal(streamed[k], whole[k]) for k in whole)
    ids = calib_ids(1, 16)
    with torch.no_grad():
        model = load_model(str(out)).model
        torch.testing.assert_close(model(ids).logits, load_model(str(tmp_path / "whole")).model(ids).logits,
                                   rtol=0, atol=0)
        assert model.generate(ids[:, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_shard_writer_names_and_indexes_shards(tmp_path):
    writer = ShardWriter(tmp_path, max_bytes=100)
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each
    for name, t in tensors.items():
        writer.add(name, t)
    names = writer.finish()
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 200
    assert {k: v for k, v in _tensors(tmp_path).items()} .keys() == tensors.keys()
    read = CheckpointTensors(tmp_path).read(list(tensors), torch.float64, "cpu")
    assert all(torch.equal(read[k], tensors[k].double()) for k in tensors)
    w = ShardWriter(tmp_path / "again")
    (tmp_path / "again").mkdir()
    w.add("a", torch.ones(1))
    with pytest.raises(ValueError, match="twice"):
        w.add("a", torch.ones(1))


def test_shard_writer_keeps_dtypes_shapes_and_oversized_tensors(tmp_path):
    # Tensors go to disk as they come (nothing held until finish): a bf16 matrix, a scalar, an
    # empty tensor, a non-contiguous view, and one larger than a shard, which gets its own.
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(3, 5, generator=gen).bfloat16(),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "view": torch.randn(4, 6, generator=gen).t(),
        "big": torch.arange(100, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }
    writer = ShardWriter(tmp_path, max_bytes=200)
    for name, t in tensors.items():
        writer.add(name, t)
    assert not list(tmp_path.glob("*.safetensors"))  # provisional until finish
    names = writer.finish()
    index = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    assert list(index.values()).count(index["big"]) == 1  # 800 bytes: a shard of its own
    read = _tensors(tmp_path)
    assert set(read) == set(tensors) and len(names) == len(set(index.values()))
    for name, t in tensors.items():
        assert read[name].dtype == t.dtype and torch.equal(read[name], t), name
    assert not list(tmp_path.glob(".shard-*"))


def test_auto_streams_only_what_does_not_fit(tmp_path, monkeypatch):
    import cmoe_carve.streaming as streaming

    dense = _dense(tmp_path, "llama")
    size = CheckpointTensors(dense).nbytes(torch.float32)
    assert size == sum(p.numel() * 4 for p in tiny_model("llama").parameters())
    assert CheckpointTensors(dense).nbytes(torch.bfloat16) == size // 2
    monkeypatch.setattr(streaming, "available_memory", lambda device: 10 * size)
    assert decide_streaming("auto", str(dense), "float32", "cpu")[0] is False
    monkeypatch.setattr(streaming, "available_memory", lambda device: size)
    stream, why = decide_streaming("auto", str(dense), "float32", "cpu")
    assert stream is True and "GiB" in why
    assert decide_streaming("off", str(dense), "float32", "cpu")[0] is False
    assert decide_streaming("on", str(dense), "float32", "cpu")[0] is True
    with pytest.raises(ModelError, match="--stream"):
        decide_streaming("sometimes", str(dense), "float32", "cpu")


def test_a_checkpoint_whose_names_do_not_match_is_refused_in_one_line(tmp_path):
    dense = _dense(tmp_path, "llama")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(dense / "model.safetensors"))
    renamed = {k.replace("model.layers.1.", "model.blocks.1."): v for k, v in weights.items()}
    save_file(renamed, str(dense / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="--stream off"):
        carve(str(dense), tmp_path / "out", stream="on", calib=str(tmp_path / "text.txt"),
              config=CarveConfig(spec="S2A2E8", k_act=5), **ARGS)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family,target", [(f, "ffn") for f in sorted(FAMILIES)] + [("llama", "stream")])
def test_windows_in_batches_carve_what_one_batch_carves(family, target, monkeypatch):
    # Many calibration windows go through each layer in batches (two passes: collect the FFN's
    # inputs, then run the carved layer); the carve must be the one a single call makes.
    import copy

    import cmoe_carve.layer_calls as carve_module
    from cmoe_carve.carve import carve_model

    ids = calib_ids(5, 16)
    config = CarveConfig(spec="S2A2E8", k_act=5, refit_target=target)
    one = tiny_model(family)
    many = copy.deepcopy(one)
    carve_model(one, ids, config, progress=False)
    assert len(carve_module.window_batches(5, 16, 100)) == 1
    monkeypatch.setattr(carve_module, "BATCH_BYTES", 16 * 100 * 16 * 2)  # two windows a batch
    assert carve_module.window_batches(5, 16, 100) == [(0, 2), (2, 4), (4, 5)]
    result = carve_model(many, ids, config, progress=False)
    assert len(result.layers) == 2
    a, b = one.state_dict(), many.state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(many(ids).logits, one(ids).logits, rtol=1e-4, atol=1e-4)
