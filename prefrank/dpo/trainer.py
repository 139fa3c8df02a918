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
from prefrank.analysis import metrics
from prefrank.data import Columns, read_examples
from prefrank.dpo.forward import completion_hidden
from prefrank.dpo.loss import fused_linear_dpo_loss
from prefrank.dpo.objective import LOSS_TYPES, dpo_loss
from prefrank.errors import InputError
from prefrank.models import CausalLM, LoadOptions
from prefrank.ops import IGNORE_INDEX
from prefrank.options import option, options, positive_float, positive_int, row_options
from prefrank.runtime import barrier, distributed, load_lm, load_run_tokenizer, process_device
from prefrank.runtime import max_length as run_max_length
from prefrank.scoring import ScoringMode, score
from prefrank.tokenization import TokenizeOptions, tokenize_examples

OPTIMIZERS = ("adamw", "rmsprop")


@options
class TrainOptions(LoadOptions, TokenizeOptions, ScoringMode):
    """Everything a training run is told (the options of `prefrank train` and `prefrank sft`).
    `decides_rows` marks what the cached reference log-probs depend on."""
    model: str = option(help="initial policy: local folder or hub id", group="data and models", path=True)
    data: str = option(help="training pairs (any format `score` reads)", group="data and models", path=True)
    out: str = option(help="output folder", group="data and models", decides_rows=False, path=True)
    val_data: str | None = option(None, "validation pairs", group="data and models", path=True,
                                  default_text="--val-fraction of --data")
    val_fraction: float = option(0.1, "share of --data held out for validation when there is no --val-data",
                                 group="data and models")
    columns: Columns = field(default_factory=Columns)
    mode: str = option("dpo", "dpo or sft", choices=("dpo", "sft"), cli=False)
    ref_model: str | None = option(None, "reference model", group="DPO", path=True,
                                   default_text="the initial policy, frozen")
    beta: float = option(0.1, "β of the DPO loss", type=positive_float, group="DPO", decides_rows=False)
    loss_type: str = option("sigmoid", "the DPO loss", choices=LOSS_TYPES, group="DPO", decides_rows=False)
    label_smoothing: float = option(0.0, "cDPO's label smoothing (sigmoid, robust)", group="DPO",
                                    decides_rows=False)
    gamma: float = option(1.0, "DPO^gamma's reference scale (loss type gamma)", group="DPO", decides_rows=False)
    lr: float | None = option(None, "learning rate", type=positive_float, group="training", decides_rows=False,
                              default_text="5e-6 for train, 1e-5 for sft")
    warmup_steps: int = option(0, "linear learning-rate warm-up (a function of the step: resumes exactly)",
                               group="training", decides_rows=False)
    optimizer: str = option("adamw", "", choices=OPTIMIZERS, group="training", decides_rows=False)
    weight_decay: float = option(0.0, "", group="training", decides_rows=False)
    epochs: int = option(1, "", type=positive_int, group="training", decides_rows=False)
    max_steps: int | None = option(None, "stop after this many optimizer steps", type=positive_int,
                                   group="training", decides_rows=False)
    batch_size: int = option(8, "pairs per micro-batch (per process under torchrun)", type=positive_int,
                             group="training", decides_rows=False)
    grad_accum: int = option(1, "micro-batches per step", type=positive_int, group="training", decides_rows=False)
    eval_every: int = option(50, "optimizer steps between evaluations (and checkpoints)", type=positive_int,
                             group="training", decides_rows=False)
    eval_pairs: int = option(256, "size of the fixed training subsample evaluated", type=positive_int,
                             group="training", decides_rows=False)
    seed: int = option(0, "of the split, the order and the model's randomness", group="training")
    resume: bool = option(False, "continue from OUT/checkpoint", group="training", decides_rows=False)
    judge_model: str | None = option(
        None, "reward model (sequence classification, one output): at each evaluation the policy and the "
        "reference sample a completion per prompt and the win rate is logged", group="judge", decides_rows=False)
    judge_prompts: int = option(64, "prompts the judge compares", type=positive_int, group="judge",
                                decides_rows=False)
    judge_max_new_tokens: int = option(64, "", type=positive_int, group="judge", decides_rows=False)

    def __post_init__(self):
        super().__post_init__()
        if self.lr is None:
            self.lr = 5e-6 if self.mode == "dpo" else 1e-5


# ---------------------------------------------------------------- one step's loss

def dpo_step_loss(lm: CausalLM, items, ref_chosen, ref_rejected, opts: TrainOptions):
    """The DPO loss of a batch of pairs with each prompt run once: the prompt pass, then both
    completions continued from its KV cache (dpo.forward.completion_hidden), then the fused loss on
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

def _load_items(path: str, tokenizer, opts: TrainOptions, max_length, log):
    """The usable pairs of `path` as token ids; rows that cannot be used, and pairs whose raters
    tied (they state no preference to learn), are left out and counted in the log."""
    examples = list(read_examples(path, opts.columns))
    tokenized, errors = tokenize_examples(examples, tokenizer, max_length=max_length, **opts.tokenize_kwargs)
    errors = {ex.index: ex.error for ex in examples if ex.error is not None} | errors
    if errors:
        first = next(ex for ex in examples if ex.index in errors)
        log(f"prefrank: {len(errors)} rows of {path} cannot be used and are left out "
            f"(first: row {first.index} (id {first.id}): {errors[first.index]})")
    ties = [ex.index for ex in examples if ex.index in tokenized and ex.tie]
    if ties:
        log(f"prefrank: {len(ties)} pairs of {path} whose raters tied (alpha = 0.5) are left out: they state no "
            f"preference")
    items = [tokenized[ex.index] for ex in examples if ex.index in tokenized and not ex.tie]
    if not items:
        raise InputError(f"{path}: no usable pairs")
    return items


def _split(items, opts):
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(opts.seed)).tolist()
    n_val = int(round(len(items) * opts.val_fraction))
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def _reference_logps(ref_lm, lists: dict[str, list], cache: Path, key: str,
                     deterministic: bool = False) -> dict[str, torch.Tensor]:
    """{name: [n, 2] float64 reference log-probs} of each list of items, computed once with the
    scorer and cached under `key`. Each list is scored on its own, as the evaluation scores the
    policy on it: the batches (and so the float rounding) are the same, and a policy equal to the
    reference has margins of exactly 0, not ±1e-7 that would count as reward accuracy."""
    from safetensors.torch import load_file, save_file
    if cache.exists():
        stored = load_file(cache)
        if bytes(stored["key"].tolist()).decode() == key and set(lists) <= set(stored):
            return {name: stored[name] for name in lists}
    logps = {name: score(ref_lm, items, deterministic=deterministic).logps.view(-1, 2) if items
             else torch.zeros(0, 2, dtype=torch.float64) for name, items in lists.items()}
    save_file({**{name: t.contiguous() for name, t in logps.items()},
               "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}, cache)
    return logps


def _reference_key(opts: TrainOptions, max_length) -> str:
    """What the reference log-probs depend on: every option that decides the rows (options.py)."""
    parts = {**row_options(opts), "max_length (resolved)": max_length}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(lm: CausalLM, items, ref_logps: torch.Tensor | None, opts: TrainOptions) -> dict:
    """Ranking accuracy, the chosen completions' negative log-likelihood per token (what SFT
    lowers), and with reference log-probs the loss the run trains with, reward accuracy and the four
    reference × policy groups."""
    was_training = lm.model.training
    lm.model.eval()
    logps = score(lm, items, deterministic=opts.deterministic).logps.view(-1, 2)
    lm.model.train(was_training)
    correct = metrics.ranking_correct(logps[:, 0].numpy(), logps[:, 1].numpy())
    lengths = torch.tensor([[len(c) for c in it.completion_ids] for it in items], dtype=torch.float64)
    out = {"pairs": len(items), "ranking_accuracy": float(correct.mean()),
           "chosen_nll_per_token": float(-logps[:, 0].sum() / lengths[:, 0].sum())}
    if ref_logps is not None:
        loss = dpo_loss(logps[:, 0], logps[:, 1], ref_logps[:, 0], ref_logps[:, 1], beta=opts.beta,
                        loss_type=opts.loss_type, label_smoothing=opts.label_smoothing, gamma=opts.gamma,
                        chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1]).numpy()
        ref = ref_logps.numpy()
        margin = metrics.dpo_margin(logps[:, 0].numpy(), logps[:, 1].numpy(), ref[:, 0], ref[:, 1], opts.beta)
        out.update(dpo_loss=float(loss.mean()), reward_accuracy=float((margin > 0).mean()),
                   groups=metrics.flip_groups(metrics.ranking_correct(ref[:, 0], ref[:, 1]), correct, loss, margin))
    return out


def _squared_distance(model, ref_params) -> float | None:
    if ref_params is None:
        return None
    return float(sum(((p.detach().double() - r.double()) ** 2).sum() for p, r in zip(model.parameters(), ref_params)))


# ---------------------------------------------------------------- checkpoints

def _optimizer(model, opts):
    optimizer = {"adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}[opts.optimizer]  # TrainOptions checks
    return optimizer(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)


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

@dataclass
class _Run:
    """What a training run holds from its setup to its end."""
    opts: TrainOptions
    rank: int
    world: int
    device: torch.device
    out: Path
    log: object
    model: torch.nn.Module
    lm: CausalLM
    tokenizer: object
    optimizer: torch.optim.Optimizer
    train_items: list
    val_items: list
    eval_index: list[int]  # the fixed training subsample evaluated
    ref_train: torch.Tensor | None  # [n, 2] reference log-probs (DPO)
    ref_eval: torch.Tensor | None  # of the evaluated subsample, scored as the evaluation scores it
    ref_val: torch.Tensor | None
    ref_params: list | None  # θref for ‖θ − θref‖² (when the shapes match)
    judge: object
    steps_per_epoch: int
    total_steps: int
    state: dict


def _setup(opts: TrainOptions, log, judge) -> _Run:
    """Processes, models, data, the reference log-probs (computed once, cached), the judge, the
    optimizer, and the state a checkpoint resumes."""
    rank, world = distributed()
    out = Path(opts.out)
    if (out / "metrics.jsonl").exists() and not opts.resume:
        raise InputError(f"{out} holds an earlier run: pass <resume> to continue it, or choose another <out>")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    device = process_device(opts.device, world)
    if rank != 0:
        log = lambda message: None  # noqa: E731  rank 0 speaks for all
    lm = load_lm(opts.model, opts, device, torch.float32)  # fp32 master weights
    model, tokenizer = lm.model, load_run_tokenizer(opts, opts.model)
    max_length = run_max_length(opts.max_length, lm)
    train_items = _load_items(opts.data, tokenizer, opts, max_length, log)
    if opts.val_data:
        val_items = _load_items(opts.val_data, tokenizer, opts, max_length, log)
    else:
        train_items, val_items = _split(train_items, opts)
    eval_index = torch.randperm(len(train_items), generator=torch.Generator().manual_seed(opts.seed + 1))
    eval_index = eval_index[:opts.eval_pairs].tolist()

    ref_lm = ref_train = ref_eval = ref_val = None
    if opts.mode == "dpo":
        ref_lm = load_lm(opts.ref_model, opts, device, torch.float32) if opts.ref_model else CausalLM(
            copy.deepcopy(model))
        ref_lm.model.eval().requires_grad_(False)
        cache, key = out / "reference_logps.safetensors", _reference_key(opts, max_length)
        lists = {"train": train_items, "eval": [train_items[i] for i in eval_index], "val": val_items}
        if rank == 0:  # one process computes and caches them; the others read the cache
            _reference_logps(ref_lm, lists, cache, key, opts.deterministic)
        barrier(world)
        refs = _reference_logps(ref_lm, lists, cache, key, opts.deterministic)
        ref_train, ref_eval, ref_val = refs["train"], refs["eval"], refs["val"]
    reference = ref_lm.model if ref_lm else model
    same_shapes = [p.shape for p in reference.parameters()] == [p.shape for p in model.parameters()]
    ref_params = [p.detach().clone() for p in reference.parameters()] if same_shapes else None

    if opts.judge_model and judge is None:
        from prefrank.dpo.judge import reward_model_judge
        prompts = [tokenizer.decode(it.prompt_ids, skip_special_tokens=True)
                   for it in (val_items or [train_items[i] for i in eval_index])[:opts.judge_prompts]]
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
    return _Run(opts, rank, world, device, out, log, model, lm, tokenizer, optimizer, train_items, val_items,
                eval_index, ref_train, ref_eval, ref_val, ref_params, judge, steps_per_epoch, total_steps, state)


def _step(run: _Run) -> float:
    """One optimizer step (its micro-batches split among the processes); returns the last loss."""
    opts, step = run.opts, run.state["step"]
    epoch, in_epoch = divmod(step, run.steps_per_epoch)
    order = torch.randperm(len(run.train_items), generator=torch.Generator().manual_seed(opts.seed * 1000 + epoch))
    start = in_epoch * opts.batch_size * opts.grad_accum * run.world
    run.optimizer.zero_grad(set_to_none=True)
    for group in run.optimizer.param_groups:
        group["lr"] = opts.lr * min(1.0, (step + 1) / opts.warmup_steps) if opts.warmup_steps else opts.lr
    # bf16 autocast on GPU (fp32 master weights and optimizer state); fp32 on CPU
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if run.device.type == "cuda" else contextlib.nullcontext()
    for micro in range(opts.grad_accum):
        first = start + (micro * run.world + run.rank) * opts.batch_size  # the ranks split each micro-batch
        index = order[first:first + opts.batch_size].tolist()
        batch = [run.train_items[i] for i in index]
        with autocast:
            if opts.mode == "dpo":
                loss, _ = dpo_step_loss(run.lm, batch, run.ref_train[index, 0], run.ref_train[index, 1], opts)
            else:
                loss, _ = sft_step_loss(run.lm, batch)
        (loss / opts.grad_accum).backward()
    if run.world > 1:
        _average_gradients(run.model, run.world)
    run.optimizer.step()
    run.state["step"] = step + 1
    return loss.item()


def _evaluate(run: _Run) -> dict | None:
    """Rank 0: one line of metrics.jsonl for the current step (the others return None)."""
    if run.rank != 0:
        return None
    step, opts = run.state["step"], run.opts
    eval_train = [run.train_items[i] for i in run.eval_index]
    ref_eval = run.ref_eval
    record = {"step": step, "epoch": step / run.steps_per_epoch, "time": time.time(),
              "param_sq_distance": _squared_distance(run.model, run.ref_params),
              "train": evaluate(run.lm, eval_train, ref_eval, opts),
              "val": evaluate(run.lm, run.val_items, run.ref_val, opts) if run.val_items else None}
    if run.judge is not None:
        run.model.eval()
        record["judge"] = run.judge(run.model, run.tokenizer)
        run.model.train()
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    run.log(f"step {step}: train ranking accuracy {record['train']['ranking_accuracy']:.3f}"
            + (f", DPO loss {record['train']['dpo_loss']:.4f}" if ref_eval is not None else
               f", chosen NLL {record['train']['chosen_nll_per_token']:.4f} per token"))
    return record


def train(opts: TrainOptions, log=print, judge=None) -> dict:
    """Train, evaluating and checkpointing as configured; returns the last evaluation.
    `judge(model, tokenizer) -> float`, if given, is called at every evaluation (e.g. a win rate
    against the reference from a reward model or a ground truth) and logged as "judge"."""
    run = _setup(opts, log, judge)
    record = _evaluate(run) if run.state["step"] == 0 else None
    run.model.train()
    from tqdm import tqdm
    bar = tqdm(total=run.total_steps, initial=run.state["step"], unit="step", disable=None if run.rank == 0 else True)
    while run.state["step"] < run.total_steps:
        loss = _step(run)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if run.state["step"] % opts.eval_every == 0 or run.state["step"] == run.total_steps:
            record = _evaluate(run)
            if run.rank == 0:
                save_checkpoint(run.out, run.model, run.tokenizer, run.optimizer,
                                {**run.state, "options": asdict(opts)})
    bar.close()
    if run.rank == 0:
        run.model.save_pretrained(run.out / "final")
        run.tokenizer.save_pretrained(run.out / "final")
    barrier(run.world)
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

