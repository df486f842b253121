"""The block manager never leaks or double-frees, whatever order requests come and go in."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.sequence import Sequence
from tokenmill.sampling import SamplingParams

PARAMS = SamplingParams(max_tokens=8)


def _seq(tokens: list[int]) -> Sequence:
    return Sequence("r", 0, tokens, PARAMS)


def _compute(manager: BlockManager, seq: Sequence, n: int) -> bool:
    """What one scheduler step does for seq: allocate, 'run', mark computed, cache full blocks."""
    if manager.allocate_slots(seq, n) is None:
        return False
    seq.num_computed_tokens += n
    manager.cache_full_blocks(seq)
    return True


def test_prefix_blocks_are_shared_and_survive_their_request():
    manager = BlockManager(num_blocks=16, block_size=4)
    first = _seq(list(range(10)))
    assert _compute(manager, first, 10)
    manager.free(first)
    assert manager.num_free_blocks == 16
    second = _seq(list(range(9)) + [99])
    reused = manager.acquire_cached_prefix(second)
    assert reused == 8  # two full blocks; the partial third is not shared
    assert second.block_table == first_blocks(manager, 2)
    assert manager.prefix_hit_rate > 0


def first_blocks(manager: BlockManager, n: int) -> list[int]:
    return [manager.cached[key] for key in sorted(manager.cached, key=lambda k: k[1])][:n]


def test_whole_prompt_hit_still_leaves_one_token_to_compute():
    manager = BlockManager(num_blocks=8, block_size=4)
    first = _seq(list(range(8)))
    assert _compute(manager, first, 8)
    again = _seq(list(range(8)))
    assert manager.acquire_cached_prefix(again) == 4


def test_cached_blocks_are_evicted_least_recently_used_first():
    manager = BlockManager(num_blocks=4, block_size=2)
    old, new = _seq([1, 2, 3]), _seq([7, 8, 9])
    for seq in (old, new):
        assert _compute(manager, seq, 3)
        manager.free(seq)
    filler = _seq([5] * 6)
    # Three blocks: first the two unnamed partial blocks, then the coldest named one (`old`'s).
    assert manager.allocate_slots(filler, 6) is not None
    assert manager.acquire_cached_prefix(_seq([1, 2, 3])) == 0
    assert manager.acquire_cached_prefix(_seq([7, 8, 9])) == 2


def test_fork_shares_blocks_and_copy_on_write_splits_the_last_one():
    manager = BlockManager(num_blocks=8, block_size=4)
    parent = _seq(list(range(6)))
    assert _compute(manager, parent, 6)
    child = _seq(list(range(6)))
    manager.fork(parent, child)
    assert all(manager.ref_counts[b] == 2 for b in parent.block_table)
    child.num_computed_tokens = 5
    copies = manager.allocate_slots(child, 1)
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0]
    assert manager.ref_counts[parent.block_table[0]] == 2
    assert manager.ref_counts[parent.block_table[1]] == 1


def test_allocation_failure_changes_nothing():
    manager = BlockManager(num_blocks=2, block_size=4)
    seq = _seq(list(range(12)))
    assert manager.allocate_slots(seq, 12) is None
    assert seq.block_table == [] and manager.num_free_blocks == 2


class BlockManagerMachine(RuleBasedStateMachine):
    """Random admit / grow / fork / preempt / finish; reference counts must always add up."""

    def __init__(self) -> None:
        super().__init__()
        self.manager = BlockManager(num_blocks=12, block_size=4)
        self.live: list[Sequence] = []

    @rule(length=st.integers(1, 20), alphabet=st.integers(1, 3))
    def admit(self, length, alphabet):
        seq = _seq([i % alphabet for i in range(length)])
        self.manager.acquire_cached_prefix(seq)
        if _compute(self.manager, seq, seq.num_tokens - seq.num_computed_tokens):
            self.live.append(seq)
        else:
            self.manager.free(seq)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 100), token=st.integers(1, 3))
    def decode(self, index, token):
        seq = self.live[index % len(self.live)]
        seq.token_ids.append(token)
        if not _compute(self.manager, seq, 1):
            seq.token_ids.pop()

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 100))
    def fork(self, index):
        parent = self.live[index % len(self.live)]
        child = _seq(list(parent.token_ids))
        self.manager.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens - 1
        if _compute(self.manager, child, 1):
            self.live.append(child)
        else:
            self.manager.free(child)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 100))
    def finish_or_preempt(self, index):
        seq = self.live.pop(index % len(self.live))
        self.manager.free(seq)

    @invariant()
    def reference_counts_add_up(self):
        expected = [0] * self.manager.num_blocks
        for seq in self.live:
            for block in seq.block_table:
                expected[block] += 1
        assert expected == self.manager.ref_counts
        free = {b for b, count in enumerate(expected) if count == 0}
        assert free == set(self.manager.free_blocks)
        for key, block in self.manager.cached.items():
            assert self.manager.block_hash[block] == key

    def teardown(self):
        for seq in self.live:
            self.manager.free(seq)
        assert self.manager.num_free_blocks == self.manager.num_blocks


BlockManagerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_block_manager_state_machine = BlockManagerMachine.TestCase
