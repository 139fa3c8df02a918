"""Length batching: the dynamic program against brute force over all contiguous partitions."""
import itertools
import random

import pytest
import torch

from prefrank.batching import length_batches, pad


def cost(batches, lengths, overhead):
    return sum(overhead + len(b) * max(lengths[i] for i in b) for b in batches)


def brute_force_cost(lengths, budget, overhead):
    """Least cost over every partition of the sorted lengths into contiguous batches."""
    s = sorted(lengths)
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=len(s) - 1):
        batches, current = [], [s[0]]
        for cut, x in zip(cuts, s[1:]):
            if cut:
                batches.append(current)
                current = []
            current.append(x)
        batches.append(current)
        if all(len(b) == 1 or len(b) * max(b) <= budget for b in batches):
            best = min(best, sum(overhead + len(b) * max(b) for b in batches))
    return best


@pytest.mark.parametrize("seed", range(30))
def test_dynamic_program_is_optimal(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 10))]
    budget, overhead = rng.choice([1, 50, 120, 400, 10_000]), rng.choice([0, 10, 128])
    batches = length_batches(lengths, budget, overhead)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each item exactly once
    assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget for b in batches)
    assert cost(batches, lengths, overhead) == brute_force_cost(lengths, budget, overhead)


def test_pad_left_and_right():
    ids, mask = pad([[1, 2, 3], [4]], 0, left=True)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad([[1, 2, 3], [4]], -100)
    assert ids.tolist() == [[1, 2, 3], [4, -100, -100]] and mask.dtype == torch.long
