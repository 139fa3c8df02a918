"""The output head, chunk by chunk: hidden states → log-probs of target tokens, and the way back
to gradients of hidden states, weight and bias, without ever holding the full [N, V] logits.

For a chunk of rows: scores = softcap·tanh(z / softcap) with z = (hidden @ weight.T + bias) / T
(no softcap: scores = z). Without softcap and temperature the scores stay in the weight's dtype,
exactly the logits the model itself would output; otherwise they are fp32. Then, in fp32,
    logp = scores[target] - lse(scores)
    d scores = g · (onehot(target) - exp(scores - lse))        g = d loss / d logp, per row
    d z = d scores · (1 - (scores / softcap)²);  d logits = d z / T
    d hidden = d logits @ weight,  d weight += d logitsᵀ @ hidden,  d bias += Σ d logits
The per-chunk log-softmax steps go to the backend the public API chose (backends.py: Triton on
CUDA, the C++ extension on CPU, torch otherwise); the matmuls stay with torch (cuBLAS / MKL), in
the weight's dtype (tensor cores for half-precision weights; d logits is rounded to that dtype, as
the model's own backward would, and d weight accumulates across chunks in it: one rounding per
chunk). Chunks hold a multiple of 128 rows where they can: a GEMM tile's height, so no tile runs
nearly empty. `LogprobsFromHidden` is the autograd Function: its forward keeps one logsumexp per
row, its backward recomputes each chunk.
"""
import torch
import torch.nn.functional as F

from prefrank.ops import backends
from prefrank.ops.torch_backend import head_logits, upcast

CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 64 << 20}  # scores per chunk: GEMMs big enough for a GPU; cache-sized on CPU


class Head:
    """The head's parameters and chunk size; `backend` runs the log-softmax steps (backends.BACKENDS).
    `chunk_bytes`: memory for one chunk's scores (None: by device, CHUNK_BYTES)."""

    def __init__(self, weight, bias=None, softcap=None, temperature=1.0, backend="torch", chunk_bytes=None):
        self.weight, self.bias, self.softcap, self.temperature = weight, bias, softcap, temperature
        self.backend = backend
        self.fp32_scores = softcap is not None or temperature != 1.0
        score_bytes = 4 if self.fp32_scores else weight.element_size()
        if chunk_bytes is None:
            chunk_bytes = CHUNK_BYTES["cuda" if weight.is_cuda else "cpu"]
        rows = max(1, chunk_bytes // (score_bytes * max(weight.shape[0], 1)))
        self.rows = rows - rows % 128 if rows >= 128 else rows

    def scores(self, hidden_rows):
        """[n, V] scores of a chunk of rows: the weight's dtype, or fp32 under softcap / temperature."""
        if self.fp32_scores:
            return head_logits(hidden_rows, self.weight, self.bias, self.softcap, self.temperature)
        return F.linear(hidden_rows.to(self.weight.dtype), self.weight, self.bias)

    def logprobs(self, scores, targets):
        """(logp, lse) of a chunk, fp32 (float64 for float64 scores); `scores` is left intact."""
        return backends.chunk_logprobs(self.backend, scores, targets)

    def new_grads(self, hidden, need_h: bool, need_w: bool, need_b: bool) -> list:
        """Zeroed [d hidden, d weight, d bias] accumulators (None where not needed): d weight in the
        GEMMs' dtype (the weight's), d bias in fp32 (float64 for float64)."""
        acc = upcast(hidden[:0]).dtype
        w = self.weight
        return [torch.zeros_like(hidden) if need_h else None,
                torch.zeros_like(w) if need_w else None,
                torch.zeros(w.shape[0], dtype=acc, device=w.device) if need_b else None]

    def backward_(self, scores, targets, lse, g, hidden_rows, grads, row_index):
        """Turn a chunk's scores (in place where they allow it) into d logits for per-row
        gradients `g`, and add the chunk's contributions to grads (see new_grads; d hidden's rows
        are written at row_index)."""
        # fp32 math, except where the Triton kernel writes d logits straight over half scores
        tanh_sq = None
        if self.fp32_scores or self.backend != "triton":
            scores = upcast(scores)  # a copy for half scores; fp32 scores are updated in place
            tanh_sq = (scores / self.softcap) ** 2 if self.softcap else None
        d_scores = backends.chunk_backward_(self.backend, scores, targets, lse, g)
        if tanh_sq is not None:
            d_scores.mul_(1 - tanh_sq)
        d_logits = (d_scores.div_(self.temperature) if self.temperature != 1.0 else d_scores).to(self.weight.dtype)
        grad_h, grad_w, grad_b = grads
        if grad_h is not None:
            grad_h[row_index] = (d_logits @ self.weight).to(grad_h.dtype)
        if grad_w is not None:
            grad_w.addmm_(d_logits.T, hidden_rows.to(grad_w.dtype))  # in place: no [V, d] temporary
        if grad_b is not None:
            grad_b += upcast(d_logits).sum(0)


class LogprobsFromHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, head: Head, ignore_index: int):
        rows = torch.nonzero(targets != ignore_index).squeeze(1)
        out = torch.zeros(targets.shape[0], dtype=upcast(hidden[:0]).dtype, device=hidden.device)
        lse = torch.empty(rows.numel(), dtype=out.dtype, device=hidden.device)
        for start in range(0, rows.numel(), head.rows):
            idx = rows[start:start + head.rows]
            logp, lse[start:start + head.rows] = head.logprobs(head.scores(hidden[idx]), targets[idx])
            out[idx] = logp.to(out.dtype)
        ctx.save_for_backward(hidden, weight, bias, targets, rows, lse)
        ctx.head = head
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, rows, lse = ctx.saved_tensors
        head = ctx.head
        grads = head.new_grads(hidden, *ctx.needs_input_grad[:3])
        for start in range(0, rows.numel(), head.rows):
            idx = rows[start:start + head.rows]
            h = hidden[idx]
            head.backward_(head.scores(h), targets[idx], lse[start:start + head.rows], grad_out[idx].to(lse.dtype), h,
                           grads, idx)
        grad_h, grad_w, grad_b = grads
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)
