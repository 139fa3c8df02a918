"""The output head, chunk by chunk: hidden states → log-probs of target tokens, and the way back
to gradients of hidden states, weight and bias, without ever holding the full [N, V] logits.

For a chunk of rows: scores = softcap·tanh(z / softcap) with z = (hidden @ weight.T + bias) / T
(no softcap: scores = z), fp32. Then
    logp = scores[target] - lse(scores)
    d scores = g · (onehot(target) - exp(scores - lse))        g = d loss / d logp, per row
    d z = d scores · (1 - (scores / softcap)²);  d logits = d z / T
    d hidden = d logits @ weight,  d weight += d logitsᵀ @ hidden,  d bias += Σ d logits
The per-chunk log-softmax steps go to the fastest backend (Triton on CUDA, the C++ extension on
CPU, torch otherwise); the matmuls stay with torch (cuBLAS / MKL). `LogprobsFromHidden` is the
autograd Function: its forward keeps one logsumexp per row, its backward recomputes each chunk.
"""
import torch

from prefrank.reference import head_logits, rows_per_chunk, upcast


class Head:
    """The head's parameters and chunk size; `backend` is ops' choice for the log-softmax steps."""

    def __init__(self, weight, bias=None, softcap=None, temperature=1.0, backend="torch", chunk_bytes=64 << 20):
        self.weight, self.bias, self.softcap, self.temperature = weight, bias, softcap, temperature
        self.backend = backend
        self.rows = rows_per_chunk(weight.shape[0], chunk_bytes)

    def scores(self, hidden_rows):
        """[n, V] fp32 (float64 for float64 inputs) scores of a chunk of rows."""
        return head_logits(hidden_rows, self.weight, self.bias, self.softcap, self.temperature)

    def logprobs(self, scores, targets):
        """(logp, lse) of a chunk; `scores` is left intact."""
        from prefrank import ops
        if self.backend == "triton":
            return ops._triton_kernels().logprobs_from_logits_forward(scores, targets)
        if self.backend == "cpp":
            logp = ops._cpp_logprobs_from_logits(scores, targets)
            return logp, scores.gather(1, targets[:, None]).squeeze(1) - logp
        lse = torch.logsumexp(scores, -1)
        return scores.gather(1, targets[:, None]).squeeze(1) - lse, lse

    def backward_(self, scores, targets, lse, g, hidden_rows, grads, row_index):
        """Turn a chunk's scores, in place, into d scores for per-row gradients `g`, and add the
        chunk's contributions to grads = [d hidden (full, rows written at row_index), d weight
        (fp32 or float64), d bias or None]."""
        from prefrank import ops
        tanh_sq = (scores / self.softcap) ** 2 if self.softcap else None
        if self.backend == "triton":
            d_scores = ops._triton_kernels().logprobs_from_logits_backward(scores, targets, lse, g, inplace=True)
        else:
            d_scores = scores.sub_(lse[:, None]).exp_().mul_(-g[:, None])
            d_scores[torch.arange(len(targets), device=targets.device), targets] += g
        if self.softcap:
            d_scores.mul_(1 - tanh_sq)
        d_logits = d_scores.div_(self.temperature) if self.temperature != 1.0 else d_scores
        grad_h, grad_w, grad_b = grads
        if grad_h is not None:
            grad_h[row_index] = (d_logits.to(self.weight.dtype) @ self.weight).to(grad_h.dtype)
        if grad_w is not None:
            grad_w.addmm_(d_logits.T, hidden_rows.to(grad_w.dtype))  # in place: no [V, d] temporary
        if grad_b is not None:
            grad_b += d_logits.sum(0)


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
        acc = upcast(hidden[:0]).dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grads = [torch.zeros_like(hidden) if need_h else None,
                 torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None,
                 torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None]
        for start in range(0, rows.numel(), head.rows):
            idx = rows[start:start + head.rows]
            h = hidden[idx]
            head.backward_(head.scores(h), targets[idx], lse[start:start + head.rows], grad_out[idx].to(acc), h,
                           grads, idx)
        grad_h, grad_w, grad_b = grads
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)
