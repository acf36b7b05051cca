"""The shard writer: files safetensors reads, shards split as the size limit says, sizes parsed."""

import json

import pytest
import torch
from safetensors import safe_open

from llmquant.checkpoint.shard_writer import INDEX_NAME, WEIGHTS_NAME, ShardWriter, parse_size, write_weights
from llmquant.errors import InvalidConfigError


def _every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 5, generator=g)
    return {"f32": base, "bf16": base.bfloat16(), "f16": base.half(), "fp8": base.to(torch.float8_e4m3fn),
            "i32": torch.randint(-2**31, 2**31 - 1, (3, 9), dtype=torch.int32, generator=g),
            "i8": torch.randint(-128, 127, (11,), dtype=torch.int8, generator=g), "i64": torch.tensor([2, 3]),
            "scalar": torch.tensor(1.5), "empty": torch.empty(0, 4), "strided": base.t()}


def _read(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_one_shard_reads_back_bit_for_bit(tmp_path):
    tensors = _every_dtype()
    assert write_weights(tensors, tmp_path) == [tmp_path / WEIGHTS_NAME]
    back = _read(tmp_path)
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        assert torch.equal(back[k].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else back[k],
                           t.contiguous().view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t)
    assert not (tmp_path / INDEX_NAME).exists() and sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME]


def test_shards_split_at_the_limit_and_are_indexed(tmp_path):
    tensors = {f"layer.{i}.weight": torch.full((100,), float(i)) for i in range(10)}  # 400 bytes each
    writer = ShardWriter(tmp_path, max_shard_bytes=1000)
    for name, t in tensors.items():  # a tensor at a time, as a streamed run adds them
        writer.add({name: t})
    paths = writer.close()
    assert [p.name for p in paths] == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 4000
    assert index["weight_map"]["layer.0.weight"] == "model-00001-of-00005.safetensors"
    assert index["weight_map"]["layer.9.weight"] == "model-00005-of-00005.safetensors"
    back = _read(tmp_path)
    assert all(torch.equal(back[k], t) for k, t in tensors.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in paths] + [INDEX_NAME])


def test_a_tensor_written_twice_is_refused(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.add({"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="twice"):
        writer.add({"a": torch.zeros(2)})


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                        ("1.5GB", 15 * 10**8), ("1234", 1234), ("10kb", 10_000)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "5 parsecs", "0", "-1GB", ""])
def test_bad_sizes_are_refused(text):
    with pytest.raises(InvalidConfigError, match="max-shard-size"):
        parse_size(text)
