"""The fused DPO loss with a vocabulary-parallel head: fused_linear_dpo_loss(..., vocab_parallel=True).

The weight (and bias) are DTensors sharded Shard(0) over a tensor-parallel group whose ranks all
hold the same hidden states, targets and reference (tensor parallelism's layout). The policy's
per-token log-probs come from ops.logprobs_from_hidden(vocab_parallel=True) (each rank its
shard's logits, the log-sum-exp and the target's logit all-reduced: ops/vocab_parallel.py), their
sums per sequence go to dpo_loss, and autograd differentiates the lot through the op's registered
backward: d hidden whole on every rank, d weight and d bias sharded like the parameters. The
reference's hidden states go through the same op. The token statistics of sequence_stats
(entropy, mean logit, argmax over the whole vocabulary) are refused, not computed from one shard.
"""
import torch

from prefrank import ops
from prefrank.dpo.inputs import check_data, check_every_sequence_scored, prepare, refuse_non_finite
from prefrank.dpo.objective import check_options, dpo_loss, dpo_metrics
from prefrank.ops import sum_by_sequence
from prefrank.ops.vocab_parallel import shard


def vocab_parallel_dpo_loss(hidden, weight, targets, sequence_ids=None, *, bias, ref_chosen_logps, ref_rejected_logps,
                            ref_hidden, ref_weight, ref_bias, num_pairs, beta, loss_type, label_smoothing, gamma,
                            softcap, temperature, ignore_index, chunk_bytes, reduction, backend, return_metrics,
                            sequence_stats):
    """fused_linear_dpo_loss's arguments and results (its docstring), the head split by vocabulary."""
    if sequence_stats:
        raise ValueError("sequence_stats: the token statistics (entropy, mean logit, argmax) need the whole "
                         "vocabulary, which vocab_parallel=True splits over the ranks; pass sequence_stats=False")
    check_options(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma, softcap=softcap,
                  temperature=temperature, reduction=reduction, chunk_bytes=chunk_bytes)
    for name, t in (("ref_weight", ref_weight), ("ref_bias", ref_bias)):
        if t is not None:
            shard(name, t)  # refused here under its own name
    flat_h, flat_t, seq, backend, ref_logps = prepare(hidden, weight, bias, targets, sequence_ids, ref_chosen_logps,
                                                      ref_rejected_logps, ref_hidden, ref_weight, ref_bias, num_pairs,
                                                      softcap, temperature, ignore_index, backend, True)
    check_data(flat_h, weight, bias, flat_t, seq, ref_logps, ignore_index)
    token = ops.logprobs_from_hidden(flat_h, weight, flat_t, bias, softcap=softcap, temperature=temperature,
                                     ignore_index=ignore_index, chunk_bytes=chunk_bytes, backend=backend,
                                     vocab_parallel=True)
    keep = flat_t != ignore_index
    ids = torch.where(keep, seq.long(), 0)  # ignored rows add 0 to sequence 0: their ids may be anything
    policy = sum_by_sequence(token, ids, ref_logps.shape[0])
    counts = sum_by_sequence(keep.to(policy.dtype), ids, ref_logps.shape[0])
    check_every_sequence_scored(counts)
    ref = ref_logps.to(policy.dtype)
    losses = dpo_loss(policy[0::2], policy[1::2], ref[0::2], ref[1::2], beta=beta, loss_type=loss_type,
                      label_smoothing=label_smoothing, gamma=gamma, chosen_lengths=counts[0::2],
                      rejected_lengths=counts[1::2])
    if not torch.isfinite(losses.detach()).all():  # this rank's shards named; the others' ranks name theirs
        refuse_non_finite(flat_h, weight.to_local(), None if bias is None else bias.to_local(), ref_logps)
    loss = losses.mean() if reduction == "mean" else losses.sum() if reduction == "sum" else losses
    if not return_metrics:
        return loss
    return loss, dpo_metrics(policy[0::2], policy[1::2], ref[0::2], ref[1::2], beta)
