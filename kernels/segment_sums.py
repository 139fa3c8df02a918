"""Per-sequence sums of per-token values (log-probs), in Triton.

    sums[s] = Σ values[cu_seqlens[s] : cu_seqlens[s + 1]]     (float64 accumulation)

One program per sequence walks its rows in blocks: deterministic (no atomics). Shapes and dtypes:
values [N] float32 / float64, cu_seqlens [S + 1] int64 (non-decreasing, cu_seqlens[0] = 0,
cu_seqlens[S] = N), sums [S] float64. For chosen/rejected pairs, sequence 2i is pair i's chosen
completion and 2i + 1 its rejected one: sums.view(-1, 2). The torch definition is
prefrank.ops.torch_backend.sum_by_sequence (with sequence ids instead of offsets).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _segment_sums_kernel(
    values_ptr, cu_seqlens_ptr, sums_ptr,  # pointers
    BLOCK: tl.constexpr,  # constants
):
    seq = tl.program_id(0)
    start = tl.load(cu_seqlens_ptr + seq)
    end = tl.load(cu_seqlens_ptr + seq + 1)
    total = tl.zeros([BLOCK], dtype=tl.float64)
    for offset in range(start, end, BLOCK):
        rows = offset + tl.arange(0, BLOCK)
        total += tl.load(values_ptr + rows, mask=rows < end, other=0.0).to(tl.float64)
    tl.store(sums_ptr + seq, tl.sum(total, axis=0))


def segment_sums(values: torch.Tensor, cu_seqlens: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """[S] float64 sums of `values` [N] over the sequences that `cu_seqlens` [S + 1] delimit."""
    n_seq = cu_seqlens.numel() - 1
    sums = torch.empty(n_seq, dtype=torch.float64, device=values.device)
    if n_seq > 0:
        _segment_sums_kernel[(n_seq,)](values.contiguous(), cu_seqlens.contiguous(), sums, BLOCK=block)
    return sums
