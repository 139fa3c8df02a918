"""The fused DPO loss's inputs, read and checked alike by its one-process form (dpo/loss.py) and
its vocabulary-parallel form (dpo/vocab_parallel.py): the layouts flattened to rows with sequence
ids, the head's dtypes and shapes, the reference's sequence log-probs (given, or scored from the
reference's hidden states), the checks on data, and the error that names a non-finite input. A
module of its own because dpo/loss.py imports dpo/vocab_parallel.py: both import this one, and it
imports neither.
"""
import torch

from prefrank import ops
from prefrank.ops import backends, sum_by_sequence
from prefrank.ops.registered import check_targets


def flatten_layout(hidden, targets, sequence_ids):
    """[2B, T, d] hidden with chosen rows first (the TRL / Liger layout) → flat rows and sequence
    ids (2i: chosen of pair i, 2i + 1: its rejected); flat inputs pass through."""
    if hidden.dim() == 2:
        if sequence_ids is None:
            raise ValueError("sequence_ids: flat [N, d] hidden states need sequence_ids (2i: chosen of pair i, "
                             "2i + 1: rejected)")
        if sequence_ids.shape != hidden.shape[:1] or sequence_ids.is_floating_point():
            raise ValueError(f"sequence_ids must be [N] = [{hidden.shape[0]}] integers; got "
                             f"{tuple(sequence_ids.shape)} {sequence_ids.dtype}")
        if targets.shape != hidden.shape[:1]:
            raise ValueError(f"targets must be [N] = [{hidden.shape[0]}] for [N, d] hidden; got {tuple(targets.shape)}")
        return hidden, targets, sequence_ids
    if sequence_ids is not None:
        raise ValueError("sequence_ids: only for flat [N, d] hidden states; [2B, T, d] hidden's rows are its sequences "
                         "(chosen rows first, then rejected): pass sequence_ids=None, or flatten hidden and targets")
    if hidden.dim() != 3 or hidden.shape[0] % 2 or targets.shape != hidden.shape[:2]:
        raise ValueError("hidden must be [2B, T, d] (chosen rows, then rejected rows) with targets [2B, T], "
                         f"or [N, d] with sequence_ids; got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    b2, t = targets.shape
    row = torch.arange(b2, device=hidden.device)
    seq = (2 * (row % (b2 // 2)) + row // (b2 // 2))[:, None].expand(b2, t)
    return hidden.reshape(b2 * t, -1), targets.reshape(-1), seq.reshape(-1)


def check_head(hidden, weight, bias, targets):
    """Dtypes and shapes of the head's inputs (flat hidden [N, d]), naming the argument."""
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, not {t.dtype}")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer token ids, not {targets.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, d] with d = {hidden.shape[-1]} (hidden's last dimension); got "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}]; got {tuple(bias.shape)}")


def reference_logps(flat_h, weight, flat_t, seq, hidden, ref_chosen_logps, ref_rejected_logps, ref_hidden,
                    ref_weight, ref_bias, num_pairs, targets, sequence_ids, softcap, temperature, ignore_index, backend, vocab_parallel):
    """The reference's sequence log-probs [2B] (2i chosen, 2i + 1 rejected)."""
    if ref_hidden is not None and (ref_chosen_logps is not None or ref_rejected_logps is not None):
        raise ValueError("the reference twice: pass ref_chosen_logps and ref_rejected_logps, or ref_hidden, not both")
    if ref_hidden is not None:
        if hidden.dim() == 3:
            n_seq = hidden.shape[0]
        elif num_pairs is not None:
            n_seq = 2 * num_pairs
        else:  # read from the data: one device sync, and a graph break under torch.compile (pass num_pairs)
            keep = flat_t != ignore_index
            n_seq = 2 * (int(seq[keep].max()) // 2 + 1) if keep.any() else 0
        ref_h, _, _ = flatten_layout(ref_hidden, targets, sequence_ids)
        if ref_h.shape != flat_h.shape:
            raise ValueError(f"ref_hidden must have hidden's shape {tuple(hidden.shape)}; got {tuple(ref_hidden.shape)}")
        ref_w = ref_weight if ref_weight is not None else weight
        check_head(ref_h, ref_w, ref_bias, flat_t)
        with torch.no_grad():
            token = ops.logprobs_from_hidden(ref_h, ref_w, flat_t, ref_bias, softcap=softcap, temperature=temperature,
                                             ignore_index=ignore_index, backend=backend, vocab_parallel=vocab_parallel)
            keep = flat_t != ignore_index
            # ignored rows add 0 to sequence 0: their ids may be anything (prompt, padding)
            return sum_by_sequence(torch.where(keep, token.double(), 0.0), torch.where(keep, seq, 0), n_seq)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError("pass the reference as ref_chosen_logps and ref_rejected_logps, or as ref_hidden")
    for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if t.dim() != 1 or not t.is_floating_point():
            raise ValueError(f"{name} must be a [B] floating-point tensor; got {tuple(t.shape)} {t.dtype}")
    if ref_chosen_logps.shape != ref_rejected_logps.shape:
        raise ValueError(f"ref_chosen_logps {tuple(ref_chosen_logps.shape)} and ref_rejected_logps "
                         f"{tuple(ref_rejected_logps.shape)} must have the same shape")
    n_pairs = ref_chosen_logps.shape[0]
    if (hidden.dim() == 3 and hidden.shape[0] != 2 * n_pairs) or (num_pairs is not None and num_pairs != n_pairs):
        got = hidden.shape[0] // 2 if hidden.dim() == 3 else num_pairs
        raise ValueError(f"ref_chosen_logps / ref_rejected_logps: {n_pairs} reference pairs for {got} policy pairs")
    return torch.stack([ref_chosen_logps, ref_rejected_logps], 1).reshape(-1).detach()


def prepare(hidden, weight, bias, targets, sequence_ids, ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight,
            ref_bias, num_pairs, softcap, temperature, ignore_index, backend, vocab_parallel: bool):
    """What both forms of the fused loss do first: (flat hidden [N, d], flat targets [N], sequence
    ids [N], the backend, the reference's sequence log-probs [2B]) from the caller's layout, the
    head checked against it."""
    flat_h, flat_t, seq = flatten_layout(hidden, targets, sequence_ids)
    check_head(flat_h, weight, bias, flat_t)
    backend = backends.choose(flat_h, backend)
    ref_logps = reference_logps(flat_h, weight, flat_t, seq, hidden, ref_chosen_logps, ref_rejected_logps, ref_hidden,
                                ref_weight, ref_bias, num_pairs, targets, sequence_ids, softcap, temperature,
                                ignore_index, backend, vocab_parallel)
    return flat_h, flat_t, seq, backend, ref_logps


def check_data(hidden, weight, bias, targets, seq_ids, ref_logps, ignore_index: int):
    """The checks on data, inside the ops (a compiled graph holds no data-dependent branch):
    targets in range, scored rows' sequence ids within the reference's pairs."""
    check_targets(targets, weight.shape[0], ignore_index)
    scored = seq_ids[targets != ignore_index]
    n_seq = ref_logps.shape[0]
    if ((scored < 0) | (scored >= n_seq)).any():
        raise ValueError(f"sequence_ids: scored rows' ids must be in [0, {n_seq}) for the {n_seq // 2} pairs of the "
                         f"reference log-probs; got ids in [{int(scored.min())}, {int(scored.max())}]")


def check_every_sequence_scored(counts):
    """Refuse a chosen or rejected sequence with no target token (counts [2B]: each sequence's),
    naming it in both layouts."""
    if (counts == 0).any():
        i = int(torch.nonzero(counts == 0)[0])
        pairs = counts.shape[0] // 2
        raise ValueError(f"targets / sequence_ids: every chosen and rejected sequence needs at least one target token; "
                         f"pair {i // 2}'s {'rejected' if i % 2 else 'chosen'} has none (row {i // 2 + i % 2 * pairs} "
                         f"of [2B, T] targets, or sequence id {i} in the flat layout)")


def refuse_non_finite(hidden, weight, bias, ref_logps):
    """A NaN or inf result: name the input that holds NaN or inf (an error, not a NaN loss)."""
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias), ("the reference log-probs", ref_logps)):
        if t is not None and not torch.isfinite(t).all():
            verb = "hold" if name.endswith("log-probs") else "holds"
            raise ValueError(f"{name} {verb} NaN or inf: the loss would be NaN")
    raise FloatingPointError("the DPO loss overflowed (finite inputs, non-finite loss): check the inputs' scale")
