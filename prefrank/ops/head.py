"""The output head, chunk by chunk: hidden states → log-probs of target tokens, and the way back
to gradients of hidden states, weight and bias, without ever holding the full [N, V] logits.

For a chunk of rows: raw = hidden @ weight.T + bias, logits = softcap·tanh(raw / T / softcap)
(no softcap: logits = raw / T). Without softcap and temperature the logits stay in the weight's
dtype, exactly what the model itself would output; otherwise they are fp32. Then, in fp32,
    logp = logits[target] - lse(logits)
    d logits = g · (onehot(target) - exp(logits - lse))        g = d loss / d logp, per row
    d raw = d logits · (1 - (logits / softcap)²) / T
    d hidden = d raw @ weight,  d weight += d rawᵀ @ hidden,  d bias += Σ d raw
The per-chunk log-softmax steps go to the backend the public API chose (backends.py: Triton on
CUDA, the C++ extension on CPU, torch otherwise); the matmuls stay with torch (cuBLAS / MKL), in
the weight's dtype (tensor cores for half-precision weights; d logits is rounded to that dtype, as
the model's own backward would). d weight and d bias accumulate across chunks in fp32 and are cast
to the weight's dtype once at the end: a half-precision accumulator would round once per chunk,
and its error would grow with the number of chunks past plain torch's single rounding. Chunks hold
a multiple of 128 rows where they can: a GEMM tile's height, so no tile runs nearly empty.
On the CPU a large vocabulary goes in tiles of TILE_COLS columns: a block of rows meets the weight
tile by tile, each tile's log-sum-exp joins the row's by logaddexp, the target's logit is read from
the tile that holds it, and the backward adds each tile's d hidden (fp32) and writes its rows of
d weight. A GEMM against a [2048, d] slice of the weight runs about a fifth faster there than
against the whole [V, d] weight with fewer rows (MKL repacks the weight on every call; bench/head.py),
and the rows per block follow the tile's width. On a GPU the tile is the whole vocabulary.
`forward` keeps one logsumexp per row, `backward` recomputes each tile; the registered op
prefrank::logprobs_from_hidden runs them (registered.py).
"""
import torch
import torch.nn.functional as F

from prefrank.ops import backends
from prefrank.ops.torch_backend import IGNORE_INDEX, head_logits, upcast

CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 64 << 20}  # logits per chunk: GEMMs big enough for a GPU; cache-sized on CPU
TILE_COLS = 2048  # the vocabulary tile's width on the CPU (measured: bench/head.py)


def _round_rows(rows: int) -> int:
    """A multiple of 128 rows (a GEMM tile's height) where there are that many."""
    return rows - rows % 128 if rows >= 128 else max(1, rows)


class Head:
    """The head's parameters and chunk sizes; `backend` runs the log-softmax steps (backends.BACKENDS).
    `chunk_bytes`: memory for one chunk's logits (None: by device, CHUNK_BYTES). `rows`: the rows of
    a chunk of whole-vocabulary logits (the fused DPO loss); `cols` and `tile_rows`: the tiles of
    forward and backward (on the CPU cols = TILE_COLS where V is wider; elsewhere cols = V and
    tile_rows = rows)."""

    def __init__(self, weight, bias=None, softcap=None, temperature=1.0, backend="torch", chunk_bytes=None):
        self.weight, self.bias, self.softcap, self.temperature = weight, bias, softcap, temperature
        self.backend = backend
        self.fp32_logits = softcap is not None or temperature != 1.0
        logit_bytes = 4 if self.fp32_logits else weight.element_size()
        if chunk_bytes is None:
            chunk_bytes = CHUNK_BYTES["cuda" if weight.is_cuda else "cpu"]
        vocab, width = weight.shape
        self.rows = _round_rows(chunk_bytes // (logit_bytes * max(vocab, 1)))
        self.cols = vocab if weight.is_cuda else min(vocab, TILE_COLS)
        # a tiled block also holds its hidden rows and their fp32 d hidden
        self.tile_rows = self.rows if self.cols == vocab else _round_rows(chunk_bytes // (4 * (self.cols + 2 * width)))

    def logits(self, hidden_rows, cols=slice(None)):
        """[n, V] logits of a chunk of rows (of the vocabulary slice `cols`): the weight's dtype, or
        fp32 under softcap / temperature."""
        weight, bias = self.weight[cols], None if self.bias is None else self.bias[cols]
        if self.fp32_logits:
            return head_logits(hidden_rows, weight, bias, self.softcap, self.temperature)
        return F.linear(hidden_rows.to(weight.dtype), weight, bias)

    def logprobs(self, logits, targets):
        """(logp, lse) of a chunk without ignored rows, fp32 (float64 for float64 logits); `logits`
        is left intact."""
        return backends.logprobs_and_lse(self.backend, logits, targets, IGNORE_INDEX)

    def new_grads(self, hidden, need_h: bool, need_w: bool, need_b: bool) -> list:
        """Zeroed [d hidden, d weight, d bias] accumulators (None where not needed): d hidden in
        hidden's dtype (each row is written once), d weight and d bias in fp32 (float64 for
        float64), cast by `finish_grads`."""
        acc = upcast(self.weight[:0]).dtype
        w = self.weight
        return [torch.zeros_like(hidden) if need_h else None,
                torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None,
                torch.zeros(w.shape[0], dtype=acc, device=w.device) if need_b else None]

    def finish_grads(self, grads) -> list:
        """The accumulators of new_grads in the parameters' dtypes."""
        grad_h, grad_w, grad_b = grads
        return [grad_h, None if grad_w is None else grad_w.to(self.weight.dtype),
                None if grad_b is None else grad_b.to(self.bias.dtype)]

    def tiled_logprobs(self, hidden_rows, targets):
        """(logp, lse) of a block of rows (no ignored rows), tile by tile over the vocabulary."""
        vocab = self.weight.shape[0]
        if self.cols == vocab:
            return self.logprobs(self.logits(hidden_rows), targets)
        lse, picked = None, torch.zeros(targets.shape, dtype=upcast(hidden_rows[:0]).dtype, device=targets.device)
        for start in range(0, vocab, self.cols):
            logits = self.logits(hidden_rows, slice(start, start + self.cols))
            local, held = local_targets(targets, start, logits.shape[1])
            tile_lse = self.logprobs(logits, local)[1]
            lse = tile_lse if lse is None else torch.logaddexp(lse, tile_lse)
            here = torch.nonzero(held).squeeze(1)
            picked[here] = upcast(logits[here, local[here]]).to(picked.dtype)
        return picked - lse, lse

    def tiled_backward_(self, hidden_rows, targets, lse, g, grads, row_index):
        """Add a block of rows' contributions to grads (see backward_), tile by tile over the
        vocabulary; d hidden is summed over the tiles in fp32 and written once."""
        vocab = self.weight.shape[0]
        if self.cols == vocab:
            return self.backward_(self.logits(hidden_rows), targets, lse, g, hidden_rows, grads, row_index)
        grad_h, grad_w, grad_b = grads
        block_h = torch.zeros(hidden_rows.shape, dtype=lse.dtype) if grad_h is not None else None
        for start in range(0, vocab, self.cols):
            cols = slice(start, start + self.cols)
            logits = self.logits(hidden_rows, cols)
            local, held = local_targets(targets, start, logits.shape[1])
            d_raw = self.d_raw_(logits, local, lse, g, torch.where(held, g, 0.0))
            self._add_grads(d_raw, hidden_rows, cols, [block_h, grad_w, grad_b])
        if grad_h is not None:
            grad_h[row_index] = block_h.to(grad_h.dtype)

    def d_raw_(self, logits, targets, lse, g, target_g=None):
        """d raw (the weight's dtype) from a chunk's logits (turned in place where they allow it)
        for per-row gradients `g`. target_g: the one-hot term's per-row weight where it is not g
        (0 for rows whose target lies outside these columns: a vocabulary tile, or another rank's
        shard; backends.logprobs_backward_)."""
        # fp32 math, except where the Triton kernel writes d logits straight over half logits
        tanh_sq = None
        if self.fp32_logits or self.backend != "triton" or target_g is not None:
            logits = upcast(logits)  # a copy for half logits; fp32 logits are updated in place
            tanh_sq = (logits / self.softcap) ** 2 if self.softcap else None
        d_logits = backends.logprobs_backward_(self.backend, logits, targets, lse, g, None,  # chunks: no ignored rows
                                               target_g)
        if tanh_sq is not None:
            d_logits.mul_(1 - tanh_sq)
        return (d_logits.div_(self.temperature) if self.temperature != 1.0 else d_logits).to(self.weight.dtype)

    def backward_(self, logits, targets, lse, g, hidden_rows, grads, row_index, target_g=None):
        """Turn a chunk's logits (in place where they allow it) into d raw for per-row gradients
        `g` (target_g: see d_raw_), and add the chunk's contributions to grads (see new_grads; d
        hidden's rows are written at row_index)."""
        d_raw = self.d_raw_(logits, targets, lse, g, target_g)
        grad_h, grad_w, grad_b = grads
        if grad_h is not None:
            grad_h[row_index] = (d_raw @ self.weight).to(grad_h.dtype)
        if grad_w is not None:
            _add_product_(grad_w, d_raw.T, hidden_rows.to(d_raw.dtype))
        if grad_b is not None:
            grad_b += upcast(d_raw).sum(0)

    def _add_grads(self, d_raw, hidden_rows, cols, grads):
        """Add a tile's d raw to [the block's fp32 d hidden, d weight, d bias] (None: not needed)."""
        block_h, grad_w, grad_b = grads
        if block_h is not None:
            _add_product_(block_h, d_raw, self.weight[cols])
        if grad_w is not None:
            _add_product_(grad_w[cols], d_raw.T, hidden_rows.to(d_raw.dtype))
        if grad_b is not None:
            grad_b[cols] += upcast(d_raw).sum(0)


def local_targets(targets, first: int, cols: int):
    """(targets as column indices of the vocabulary slice first .. first + cols - 1, 0 where the
    slice does not hold them; whether it holds them)."""
    local = targets - first
    held = (local >= 0) & (local < cols)
    return torch.where(held, local, 0), held


def _add_product_(acc, a, b):
    """acc += a @ b, with acc fp32 (or float64) and a, b maybe half: the product is accumulated in
    acc's precision, not rounded to the operands' dtype first."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)  # in place: no [V, d] temporary
    elif a.is_cuda:
        acc += torch.mm(a, b, out_dtype=acc.dtype)  # half GEMM (tensor cores), fp32 result
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))  # CPU has no half GEMM with an fp32 result


def forward(hidden, weight, bias, targets, head: Head, ignore_index: int):
    """(logp [N], lse [N]) of `targets` [N] under the head applied to `hidden` [N, d], in fp32
    (float64 for float64 hidden states); 0 in both at ignored rows, which cost nothing."""
    rows = torch.nonzero(targets != ignore_index).squeeze(1)
    acc = upcast(hidden[:0]).dtype
    out = torch.zeros(targets.shape[0], dtype=acc, device=hidden.device)
    lse = torch.zeros(targets.shape[0], dtype=acc, device=hidden.device)
    for start in range(0, rows.numel(), head.tile_rows):
        idx = rows[start:start + head.tile_rows]
        logp, block_lse = head.tiled_logprobs(hidden[idx], targets[idx])
        out[idx], lse[idx] = logp.to(acc), block_lse.to(acc)
    return out, lse


def backward(grad_out, hidden, targets, lse, head: Head, ignore_index: int, need_h: bool, need_w: bool,
             need_b: bool) -> list:
    """[d hidden, d weight, d bias] (None where not needed) for per-row upstream gradients
    grad_out [N], recomputing each tile's logits; lse from `forward`."""
    rows = torch.nonzero(targets != ignore_index).squeeze(1)
    grads = head.new_grads(hidden, need_h, need_w, need_b)
    for start in range(0, rows.numel(), head.tile_rows):
        idx = rows[start:start + head.tile_rows]
        head.tiled_backward_(hidden[idx], targets[idx], lse[idx], grad_out[idx].to(lse.dtype), grads, idx)
    return head.finish_grads(grads)
