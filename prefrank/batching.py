"""Length-bucketed batches under a token budget, and padding.

Padding was half the cost of naive scoring on real data (DESIGN.md): items are sorted by length
and grouped so that each batch's padded size (count × longest) stays within the budget.
"""
import numpy as np
import torch


def length_batches(lengths: list[int], budget: int, overhead: int = 128) -> list[list[int]]:
    """Indices into `lengths`, sorted by length and cut into batches that minimize the padded
    work Σ (overhead + len(batch) × longest in batch), each within len(batch) × longest ≤ budget
    (an item longer than the budget gets a batch of its own).

    `overhead` is a forward call's fixed cost in tokens: too little gives many tiny batches, too
    much gives padding. An exact dynamic program over the sorted lengths, O(n × budget / length).
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sorted_lengths = np.array([lengths[i] for i in order], dtype=np.int64)
    n = len(order)
    best = np.zeros(n + 1)  # best[j]: least cost of batching the first j sorted items
    start = np.zeros(n + 1, dtype=np.int64)  # start[j]: where the last batch of that solution begins
    for j in range(1, n + 1):
        longest = sorted_lengths[j - 1]
        first = max(0, j - max(1, budget // max(longest, 1)))
        starts = np.arange(first, j)
        cost = best[first:j] + overhead + (j - starts) * longest
        k = int(np.argmin(cost))
        best[j], start[j] = cost[k], starts[k]
    batches, j = [], n
    while j > 0:
        batches.append(order[start[j]:j])
        j = start[j]
    return batches[::-1]


def pad(seqs: list[list[int]], value: int, *, left: bool = False, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] int64 tensor of `seqs` padded with `value` (on the left or right), and its 0/1 mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, cols] = torch.tensor(s, dtype=torch.long)
        mask[row, cols] = 1
    return ids.to(device), mask.to(device)
