from itertools import pairwise
from pathlib import Path

import pytest
import torch

from tests.conftest import make_engine
from tokenmill.layers.linear import DenseLinear
from tokenmill.models.llama import LlamaModel
from tokenmill.models.loader import load_model
from tokenmill.models.weight_arena import ALIGN, HUGE_PAGE, pack_weights, zeros_on_huge_pages


def _back_to_back(tensors: list[torch.Tensor]) -> bool:
    """Each tensor starts where the previous one ends, rounded up to a cache line."""
    for before, after in pairwise(tensors):
        end = before.data_ptr() + before.nbytes
        if not 0 <= after.data_ptr() - end < ALIGN:
            return False
    return True


def _huge_pages_on() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and ("[always]" in path.read_text() or "[madvise]" in path.read_text())


def _huge_page_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the 2 MB pages behind `tensor`'s memory (from /proc/self/smaps; 0 where it cannot tell)."""
    address = tensor.data_ptr()
    try:
        with open("/proc/self/smaps") as smaps:
            inside = False
            for line in smaps:
                fields = line.split()
                if "-" in fields[0] and len(fields) >= 5:
                    low, high = (int(part, 16) for part in fields[0].split("-"))
                    inside = low <= address < high
                elif inside and fields[0] == "AnonHugePages:":
                    return int(fields[1]) * 1024
    except OSError:
        return 0
    return 0


def test_packed_copies_hold_the_same_values_back_to_back_in_order():
    torch.manual_seed(0)
    tensors = [
        torch.randn(96, 64),
        torch.randint(0, 255, (7, 3, 512), dtype=torch.uint8),
        torch.randn(5),  # 20 bytes: the next one still starts on a cache line
        torch.randint(0, 255, (4, 160), dtype=torch.uint8),
    ]
    packed = pack_weights(tensors)
    for original, copy in zip(tensors, packed, strict=True):
        assert copy.dtype == original.dtype and copy.shape == original.shape
        assert torch.equal(copy, original)
        assert copy.data_ptr() % ALIGN == 0
    assert packed[0].data_ptr() % HUGE_PAGE == 0
    assert _back_to_back(packed)
    packed[1].zero_()  # copies, not views of the originals
    assert tensors[1].any()


def test_packed_weights_outlive_everything_but_their_views():
    views = pack_weights([torch.arange(1000, dtype=torch.float32)])
    total = float(views[0].sum())  # the mapping is alive with no other reference to it
    assert total == sum(range(1000))


def test_the_arena_sits_on_huge_pages_where_the_system_offers_them():
    if not _huge_pages_on():
        pytest.skip("transparent huge pages are off on this machine")
    packed = pack_weights([torch.ones(3 * HUGE_PAGE // 4)])
    assert _huge_page_bytes(packed[0]) >= HUGE_PAGE


def test_huge_page_zeros_are_zeros_of_the_shape_asked_for():
    cache = zeros_on_huge_pages((3, 2, 1000, 3, 68), torch.int8)
    assert cache.shape == (3, 2, 1000, 3, 68) and cache.dtype == torch.int8 and cache.is_contiguous()
    assert not cache.any()
    cache[2, 1, 999, 2, 67] = 5  # writable to its last byte
    assert int(cache.sum()) == 5
    floats = zeros_on_huge_pages((5, 7), torch.float32)
    assert floats.shape == (5, 7) and not floats.any()


def test_the_engines_kv_cache_sits_on_huge_pages(tiny_models):
    if not _huge_pages_on():
        pytest.skip("transparent huge pages are off on this machine")
    engine = make_engine(load_model(tiny_models["llama"][0]), kv_cache_gib=0.01)
    cache = engine.runner.kv_cache
    assert cache.nbytes >= 2 * HUGE_PAGE and not cache.any()
    cache.fill_(0)  # huge pages arrive as the memory is first touched
    assert _huge_page_bytes(cache) >= HUGE_PAGE


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_a_models_matmul_weights_lie_in_decode_step_order(tiny_models, quantization):
    loaded = load_model(tiny_models["llama"][0])  # tied embeddings
    cfg = loaded.config
    model = LlamaModel(cfg, loaded.weights, 64, quantization)
    streamed = [linear.streamed for linear in model.linears]  # each layer's four, then the LM head
    assert len(streamed) == 4 * cfg.num_layers + 1
    assert _back_to_back(streamed)
    if quantization is None:  # the tied head still shares the embedding's rows
        assert isinstance(model.lm_head, DenseLinear)
        assert model.embed.data_ptr() == model.lm_head.weight.data_ptr()
