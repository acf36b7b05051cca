"""int32 packing is bit-identical to the compressed-tensors format vLLM reads."""

import pytest
import torch

from llmquant.quant.packing import pack_int32, unpack_int32


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(3, 8), (37, 100), (16, 576)])
@pytest.mark.parametrize("dim", [0, 1])
def test_roundtrip(bits, shape, dim):
    torch.manual_seed(0)
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, dtype=torch.int8)
    packed = pack_int32(q, bits, packed_dim=dim)
    assert packed.dtype == torch.int32
    assert torch.equal(unpack_int32(packed, bits, shape, packed_dim=dim), q)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_bits_match_compressed_tensors(bits, dim):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    torch.manual_seed(1)
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (40, 72), dtype=torch.int8)
    assert torch.equal(pack_int32(q, bits, packed_dim=dim), helpers.pack_to_int32(q, bits, packed_dim=dim))


def test_known_layout():
    # value i of a row sits in bits [4i, 4i+4) of the word, offset by +8.
    q = torch.tensor([[-8, -7, 0, 7, 0, 0, 0, 0]], dtype=torch.int8)
    word = int(pack_int32(q, 4)[0, 0]) & 0xFFFFFFFF
    assert word == 0x8888F810
