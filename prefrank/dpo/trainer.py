"""A minimal DPO trainer that watches rankings while it trains, and the SFT that makes its
reference model (the paper's recipe: fine-tune on the chosen completions).

Per step, each pair's prompt runs once; both completions continue from its KV cache, with
gradients flowing back through the shared prompt (the scorer's prompt and continuation passes,
with autograd on), and the fused DPO loss takes the completion tokens' hidden states. The
reference log-probs are computed once with the scorer and cached. Every `eval_every` steps (and
at step 0) it scores a fixed training subsample and the validation pairs with the current policy
and writes one JSON line: ranking accuracy, DPO loss, reward accuracy, the four reference × policy
groups, and ‖θ − θref‖². Checkpoints are safetensors (model, optimizer state, RNG); `resume`
continues exactly where a checkpoint left off. Under torchrun (gloo on CPU, nccl on GPU) each
process takes its share of every micro-batch and the gradients are averaged before each step, so
N processes with batch B train like one process with batch N·B.
"""
import contextlib
import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from prefrank import ops
from prefrank.ops import IGNORE_INDEX
from prefrank.analysis import metrics
from prefrank.data import Columns, InputError, read_examples
from prefrank.dpo.loss import LOSS_TYPES, fused_linear_dpo_loss
from prefrank.models import CausalLM, load_model, load_tokenizer, resolve_device
from prefrank.pipeline import _barrier, distributed
from prefrank.scoring import completion_hidden, score
from prefrank.tokenization import tokenize_examples

OPTIMIZERS = ("adamw", "rmsprop")


@dataclass
class TrainOptions:
    model: str
    data: str
    out: str
    mode: str = "dpo"  # or "sft"
    ref_model: str | None = None  # default: the initial policy, frozen
    val_data: str | None = None
    val_fraction: float = 0.1  # of `data`, when there is no val_data
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    gamma: float = 1.0
    lr: float = 5e-6
    warmup_steps: int = 0  # linear warm-up of the learning rate (a function of the step: resumes exactly)
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    eval_every: int = 50
    eval_pairs: int = 256
    max_steps: int | None = None
    seed: int = 0
    tokenization: str = "joint"  # TOKENIZATION_MODES, as for scoring
    max_length: int | None = None
    truncate: str = "none"
    append_eos: bool = False
    columns: Columns = field(default_factory=Columns)
    device: str = "auto"
    resume: bool = False
    judge_model: str | None = None  # a reward model: win rate against the reference at each evaluation
    judge_prompts: int = 64
    judge_max_new_tokens: int = 64
    trust_remote_code: bool = False
    allow_pickle: bool = False


# ---------------------------------------------------------------- one step's loss

def dpo_step_loss(lm: CausalLM, items, ref_chosen, ref_rejected, opts: TrainOptions):
    """The DPO loss of a batch of pairs with each prompt run once: the prompt pass, then both
    completions continued from its KV cache (scoring.completion_hidden), then the fused loss on
    the completion tokens' hidden states. Differentiable w.r.t. every model parameter."""
    # completions are flattened in item order: chosen of pair i is 2i, its rejected 2i + 1
    hidden, targets, sequence = completion_hidden(lm, items, "kv")
    return fused_linear_dpo_loss(hidden, lm.weight, targets, sequence, bias=lm.bias, ref_chosen_logps=ref_chosen,
                                 ref_rejected_logps=ref_rejected, beta=opts.beta, loss_type=opts.loss_type,
                                 label_smoothing=opts.label_smoothing, gamma=opts.gamma, softcap=lm.softcap,
                                 temperature=lm.temperature)


def sft_step_loss(lm: CausalLM, items):
    """Mean negative log-likelihood of the chosen completions given their prompts (token-averaged)."""
    from prefrank.batching import pad
    sequences = [it.prompt_ids + it.completion_ids[0] for it in items]
    ids, mask = pad(sequences, 0, device=lm.device)
    labels, _ = pad([[IGNORE_INDEX] * len(it.prompt_ids) + it.completion_ids[0] for it in items], IGNORE_INDEX,
                    device=lm.device)
    positions = torch.arange(ids.shape[1], device=lm.device).expand_as(ids)
    hidden = lm.hidden(ids, None, positions)  # right padding: pure causal attention, pads never seen
    targets = labels[:, 1:].flatten()
    logp = ops.logprobs_from_hidden(hidden[:, :-1].flatten(0, 1), lm.weight, targets, **lm.head_kwargs)
    return -logp.sum() / (targets != IGNORE_INDEX).sum(), {}


# ---------------------------------------------------------------- data and reference

def _load_items(path: str, tokenizer, opts, max_length, log):
    examples = list(read_examples(path, opts.columns))
    items = list(tokenize_examples(examples, tokenizer, mode=opts.tokenization, max_length=max_length,
                                   truncate=opts.truncate, append_eos=opts.append_eos).values())
    bad = [ex for ex in examples if ex.error is not None]
    if bad:
        log(f"prefrank: {len(bad)} rows of {path} cannot be used and are left out "
            f"(first: row {bad[0].index} (id {bad[0].id}): {bad[0].error})")
    if not items:
        raise InputError(f"{path}: no usable pairs")
    return items


def _split(items, opts):
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(opts.seed)).tolist()
    n_val = int(round(len(items) * opts.val_fraction))
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def _reference_logps(ref_lm, items, cache: Path, key: str) -> torch.Tensor:
    """[n, 2] float64 reference log-probs, computed once with the scorer and cached under `key`."""
    from safetensors.torch import load_file, save_file
    if cache.exists():
        stored = load_file(cache)
        if bytes(stored["key"].tolist()).decode() == key:
            return stored["logps"]
    logps = score(ref_lm, items).logps.view(-1, 2)
    save_file({"logps": logps.contiguous(), "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}, cache)
    return logps


def _items_key(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(lm: CausalLM, items, ref_logps: torch.Tensor | None, beta: float) -> dict:
    """Ranking accuracy, and with reference log-probs the DPO loss, reward accuracy and groups."""
    was_training = lm.model.training
    lm.model.eval()
    logps = score(lm, items).logps.view(-1, 2).numpy()
    lm.model.train(was_training)
    correct = metrics.ranking_correct(logps[:, 0], logps[:, 1])
    out = {"pairs": len(items), "ranking_accuracy": float(correct.mean())}
    if ref_logps is not None:
        ref = ref_logps.numpy()
        margin = metrics.dpo_margin(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta)
        loss = metrics.dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta)
        out.update(dpo_loss=float(loss.mean()), reward_accuracy=float((margin > 0).mean()),
                   groups=metrics.flip_groups(metrics.ranking_correct(ref[:, 0], ref[:, 1]), correct, loss, margin))
    return out


def _squared_distance(model, ref_params) -> float | None:
    if ref_params is None:
        return None
    return float(sum(((p.detach().double() - r.double()) ** 2).sum() for p, r in zip(model.parameters(), ref_params)))


# ---------------------------------------------------------------- checkpoints

def _optimizer(model, opts):
    if opts.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    if opts.optimizer == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    raise InputError(f"--optimizer {opts.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")


def save_checkpoint(out: Path, model, tokenizer, optimizer, state: dict):
    """out/checkpoint: model (safetensors), optimizer tensors (safetensors) and structure (JSON),
    RNG state and trainer state; replaced atomically (a crash leaves the previous one)."""
    from safetensors.torch import save_file
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    opt_state = optimizer.state_dict()
    tensors, structure = {"rng": torch.get_rng_state()}, {"param_groups": opt_state["param_groups"], "state": {}}
    for index, param_state in opt_state["state"].items():
        structure["state"][str(index)] = {}
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.contiguous()
            else:
                structure["state"][str(index)][name] = value
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "optimizer.json").write_text(json.dumps(structure))
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str))
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, model, optimizer) -> dict:
    from safetensors.torch import load_file, load_model
    ckpt = out / "checkpoint" if (out / "checkpoint").exists() else out / "checkpoint.old"
    load_model(model, ckpt / "model.safetensors", strict=False)
    tensors = load_file(ckpt / "optimizer.safetensors")
    structure = json.loads((ckpt / "optimizer.json").read_text())
    state = {int(i): dict(s) for i, s in structure["state"].items()}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state[int(index)][name] = value
    optimizer.load_state_dict({"state": state, "param_groups": structure["param_groups"]})
    torch.set_rng_state(tensors["rng"])
    return json.loads((ckpt / "trainer_state.json").read_text())


# ---------------------------------------------------------------- the loop

def train(opts: TrainOptions, log=print, judge=None) -> dict:
    """Train, evaluating and checkpointing as configured; returns the last evaluation.
    `judge(model, tokenizer) -> float`, if given, is called at every evaluation (e.g. a win rate
    against the reference from a reward model or a ground truth) and logged as "judge"."""
    if opts.mode == "dpo" and opts.loss_type not in LOSS_TYPES:
        raise InputError(f"--loss-type {opts.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    rank, world = distributed()
    out = Path(opts.out)
    if (out / "metrics.jsonl").exists() and not opts.resume:
        raise InputError(f"{out} holds an earlier run: pass --resume to continue it, or choose another --out")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    device = resolve_device(opts.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if rank != 0:
        log = lambda message: None  # noqa: E731  rank 0 speaks for all
    model = load_model(opts.model, dtype=torch.float32, device=device, trust_remote_code=opts.trust_remote_code,
                       allow_pickle=opts.allow_pickle)
    tokenizer = load_tokenizer(opts.model, trust_remote_code=opts.trust_remote_code)
    lm = CausalLM(model)
    limits = [m for m in (opts.max_length, lm.max_positions) if m]
    max_length = min(limits) if limits else None
    train_items = _load_items(opts.data, tokenizer, opts, max_length, log)
    if opts.val_data:
        val_items = _load_items(opts.val_data, tokenizer, opts, max_length, log)
    else:
        train_items, val_items = _split(train_items, opts)
    eval_index = torch.randperm(len(train_items), generator=torch.Generator().manual_seed(opts.seed + 1))
    eval_index = eval_index[:opts.eval_pairs].tolist()
    eval_train = [train_items[i] for i in eval_index]

    ref_lm, ref_params = None, None
    if opts.mode == "dpo":
        ref_model = (load_model(opts.ref_model, dtype=torch.float32, device=device,
                                trust_remote_code=opts.trust_remote_code, allow_pickle=opts.allow_pickle)
                     if opts.ref_model else copy.deepcopy(model)).eval().requires_grad_(False)
        ref_lm = CausalLM(ref_model)
        if [p.shape for p in ref_model.parameters()] == [p.shape for p in model.parameters()]:
            ref_params = [p.detach().clone() for p in ref_model.parameters()]
        key = _items_key(opts.ref_model or opts.model, opts.data, opts.val_data, opts.val_fraction, opts.seed,
                         asdict(opts.columns), max_length, opts.truncate, opts.tokenization, opts.append_eos)
        if rank == 0:  # one process computes and caches them; the others read the cache
            _reference_logps(ref_lm, train_items + val_items, out / "reference_logps.safetensors", key)
        _barrier(world)
        ref_all = _reference_logps(ref_lm, train_items + val_items, out / "reference_logps.safetensors", key)
        ref_train, ref_val = ref_all[:len(train_items)], ref_all[len(train_items):]
        ref_eval_train = ref_train[eval_index]
    else:
        ref_params = [p.detach().clone() for p in model.parameters()]

    if opts.judge_model and judge is None:
        from prefrank.dpo.judge import reward_model_judge
        prompts = [tokenizer.decode(it.prompt_ids, skip_special_tokens=True)
                   for it in (val_items or eval_train)[:opts.judge_prompts]]
        judge = reward_model_judge(opts.judge_model, ref_lm.model if ref_lm else copy.deepcopy(model).eval(), prompts,
                                   max_new_tokens=opts.judge_max_new_tokens, seed=opts.seed,
                                   trust_remote_code=opts.trust_remote_code)
    optimizer = _optimizer(model, opts)
    state = {"step": 0}
    if opts.resume and ((out / "checkpoint").exists() or (out / "checkpoint.old").exists()):
        state = load_checkpoint(out, model, optimizer)
        log(f"prefrank: resumed at step {state['step']}")
        _truncate_metrics(out / "metrics.jsonl", state["step"])
    # One optimizer step takes batch_size × grad_accum pairs on each of the `world` processes.
    steps_per_epoch = max(1, len(train_items) // (opts.batch_size * opts.grad_accum * world))
    total_steps = min(opts.max_steps or 10**12, steps_per_epoch * opts.epochs)

    def eval_and_log(step):
        if rank != 0:
            return None
        record = {"step": step, "epoch": step / steps_per_epoch, "time": time.time(),
                  "param_sq_distance": _squared_distance(model, ref_params),
                  "train": evaluate(lm, eval_train, ref_eval_train if ref_lm else None, opts.beta),
                  "val": evaluate(lm, val_items, ref_val if ref_lm else None, opts.beta) if val_items else None}
        if judge is not None:
            model.eval()
            record["judge"] = judge(model, tokenizer)
            model.train()
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log(f"step {step}: train ranking accuracy {record['train']['ranking_accuracy']:.3f}"
            + (f", DPO loss {record['train']['dpo_loss']:.4f}" if ref_lm else ""))
        return record

    record = eval_and_log(0) if state["step"] == 0 else None
    # bf16 autocast on GPU (fp32 master weights and optimizer state); fp32 on CPU
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    model.train()
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=state["step"], unit="step", disable=None if rank == 0 else True)
    while state["step"] < total_steps:
        step = state["step"]
        epoch, in_epoch = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train_items), generator=torch.Generator().manual_seed(opts.seed * 1000 + epoch))
        start = in_epoch * opts.batch_size * opts.grad_accum * world
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:
            group["lr"] = opts.lr * min(1.0, (step + 1) / opts.warmup_steps) if opts.warmup_steps else opts.lr
        for micro in range(opts.grad_accum):
            first = start + (micro * world + rank) * opts.batch_size  # the ranks split each micro-batch
            index = order[first:first + opts.batch_size].tolist()
            batch = [train_items[i] for i in index]
            with autocast:
                if opts.mode == "dpo":
                    loss, _ = dpo_step_loss(lm, batch, ref_train[index, 0], ref_train[index, 1], opts)
                else:
                    loss, _ = sft_step_loss(lm, batch)
            (loss / opts.grad_accum).backward()
        if world > 1:
            _average_gradients(model, world)
        optimizer.step()
        state["step"] = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if state["step"] % opts.eval_every == 0 or state["step"] == total_steps:
            record = eval_and_log(state["step"])
            if rank == 0:
                save_checkpoint(out, model, tokenizer, optimizer, {**state, "options": asdict(opts)})
    bar.close()
    if rank == 0:
        model.save_pretrained(out / "final")
        tokenizer.save_pretrained(out / "final")
    _barrier(world)
    return record


def _average_gradients(model, world: int):
    """Data parallelism: every process's gradients become their mean, in one all-reduce."""
    import torch.distributed as dist
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _truncate_metrics(path: Path, step: int):
    """Drop evaluation lines past the checkpoint's step (written before a crash)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))

