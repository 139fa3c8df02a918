"""The training forward: the hidden states that predict each completion token, each prompt run once,
differentiable w.r.t. the model, for the DPO losses (prefrank.dpo.trainer, the TRL drop-in). It
reuses the scorer's passes (prefrank.scoring) outside inference mode."""
import torch

from prefrank.ops import IGNORE_INDEX
from prefrank.scoring import continuation_pass, flatten_completions, packed_layout, packed_rows, prompt_pass
from prefrank.tokenization import Tokenized


def completion_hidden(lm, items: list[Tokenized], method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For training: the hidden state that predicts each completion token of `items`, each prompt
    run once, in one batch, differentiable w.r.t. the model (no inference mode). `method` is
    "packed" (one forward under the block mask) or "kv" (the prompt pass, then one continuation
    pass from its cache: gradients flow back through the shared prompt). Returns hidden [N, d],
    targets [N] (the predicted ids) and completion [N] (each token's completion, flattened in item
    order: item 0's completions first)."""
    if method == "packed":
        packed = packed_layout(lm, items, list(range(len(items))), packed_rows(items))
        hidden = lm.hidden(packed.ids, packed.mask, packed.positions).flatten(0, 1)
        return hidden[packed.source], packed.targets, packed.owner
    if method != "kv":
        raise ValueError(f"method {method!r}: completion_hidden takes packed or kv")
    owner, completions = flatten_completions(items)
    prompt_batch, last_hidden = prompt_pass(lm, [it.prompt_ids for it in items])
    as_tensor = lambda values: torch.tensor(values, device=lm.device)  # noqa: E731
    # token 0 of every completion is predicted by its prompt's last position
    hidden, targets = [last_hidden[as_tensor(owner)]], [as_tensor([c[0] for c in completions])]
    which = [as_tensor(range(len(completions)))]
    longer = [s for s, c in enumerate(completions) if len(c) > 1]
    if longer:
        cont_hidden, cont_targets = continuation_pass(lm, [prompt_batch], [(0, owner[s]) for s in longer],
                                                      [completions[s] for s in longer])
        keep = cont_targets.flatten() != IGNORE_INDEX
        hidden.append(cont_hidden.flatten(0, 1)[keep])
        targets.append(cont_targets.flatten()[keep])
        which.append(as_tensor(longer).repeat_interleave(cont_hidden.shape[1])[keep])
    return torch.cat(hidden), torch.cat(targets), torch.cat(which)
