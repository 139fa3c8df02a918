"""prefrank inside TRL's DPOTrainer: change one import (requires `trl`; written against TRL 1.16,
whose private `_compute_loss` and `_precompute_ref_logps` it overrides).

    from prefrank.dpo.trl_trainer import PrefrankDPOTrainer   # instead of trl.DPOTrainer
    trainer = PrefrankDPOTrainer(model=model, args=DPOConfig(...), train_dataset=ds, processing_class=tok)

Same datasets, collator, reference handling and logged metrics as DPOTrainer; what changes:

- Training: each pair's prompt runs once. The pairs are rebuilt from TRL's collated batch (its ids,
  after its truncation: trl_reference.pair_items), the policy runs them in prefrank's packed
  layout under the block mask (or, where the model or the rows call for it, the prompt pass and
  both completions continued from its KV cache, gradients flowing back through the shared
  prompt), and the completion tokens' final hidden states go through prefrank's fused linear DPO
  loss: the [2B, T, V] logits never exist, and no prompt token is computed twice. A reference
  model is scored the same way (under no grad). The forward runs inside the model's own call,
  so DDP (and accelerate's gradient accumulation) sees it as the model's forward and averages
  the gradients. Loss types sigmoid, robust, hinge and ipo; for anything else (other loss types
  or mixtures, f-divergences, LD-alpha, WPO weighting, MoE auxiliary losses, PEFT models, a
  batch whose completion starts without context, return_outputs) it defers to DPOTrainer.
- precompute_ref_log_probs=True: the reference log-probs come from prefrank's scorer on TRL's
  own tokenized rows, written as a prefrank score table in streaming parts (resumable after a
  crash, reused while data and model match, for an IterableDataset too, chunks shared among the
  ranks under torchrun) — or from a score table that `prefrank score` wrote (`ref_scores`).
"""
import functools
import hashlib
import json
import time
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, is_peft_model
from datasets import Dataset, IterableDataset, concatenate_datasets
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from prefrank import __version__
from prefrank.dpo import trl_reference
from prefrank.dpo.forward import completion_hidden
from prefrank.dpo.loss import fused_linear_dpo_loss
from prefrank.models import CausalLM, HeadError
from prefrank.scoring import resolve_method, unsupported
from prefrank.table import Sidecar

FUSED_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")  # batch keys that are no model input
logger = get_logger(__name__)
ROW = "prefrank_row"  # the row's index in the data before TRL's preparation (with ref_scores)


def _checked_lm(model, precision) -> tuple[CausalLM | None, str | None]:
    """The model as prefrank's adapter sees it, or why prefrank cannot compute its log-probs;
    checked in `precision`, the accelerator's autocast, in which the training step runs it."""
    try:
        lm = CausalLM(model)
        with precision:
            lm.check_head()
    except HeadError as e:
        return None, str(e)
    return lm, None


def _route(model):
    """Let `model(prefrank_step=fn)` run `fn()` as the model's forward: called through DDP (or any
    wrapper), the wrapper then does what it does around a forward (DDP readies its gradient
    all-reduce, accelerate's no_sync under gradient accumulation), which calling the decoder
    directly would skip (TRL #7245: every parameter diverged across ranks that way)."""
    own = model.forward

    @functools.wraps(own)
    def forward(*args, prefrank_step=None, **kwargs):
        return own(*args, **kwargs) if prefrank_step is None else prefrank_step()

    model.forward = forward


def _lookup(by_id: dict, row: dict) -> dict:
    values = by_id.get(trl_reference.row_digest(row))
    if values is None:
        raise ValueError("the IterableDataset yields a row that was not there when its reference log-probs were "
                         "precomputed: it must yield the same rows (in any order) on every pass")
    return {"ref_chosen_logps": values[0], "ref_rejected_logps": values[1]}


class PrefrankDPOTrainer(DPOTrainer):
    """DPOTrainer with prefrank's prefix-shared fused training step and reference precompute.

    Beside DPOTrainer's arguments:
      ref_scores: a prefrank score table (path) holding the reference log-probs of train_dataset's
        rows, in order (`ref_logp_*` columns, else `logp_*`), or {dataset name: path} ("train",
        "eval", or the eval dict's keys). Needs precompute_ref_log_probs=True and a map-style
        Dataset; its row ids and token counts must be the dataset's as TRL trains on them (score
        it with `prefrank score --tokenization trl`).
      ref_cache_dir: where precomputed reference tables go (default: beside the dataset's cache
        files, else args.output_dir/prefrank_ref_logps).
    """

    def __init__(self, *args, ref_scores=None, ref_cache_dir=None, deterministic: bool = False, **kwargs):
        self._ref_scores = dict(ref_scores) if isinstance(ref_scores, dict) else (
            {"train": ref_scores} if ref_scores is not None else {})
        self._ref_cache_dir = ref_cache_dir
        self._deterministic = deterministic  # the reference precompute's mode (prefrank.scoring.score_alone)
        self._row_ids = {}  # dataset name → its rows' ids as a score table names them
        super().__init__(*args, **kwargs)
        unused = sorted(set(self._ref_scores) - set(self._row_ids))
        if unused:
            raise ValueError(f"ref_scores names {', '.join(unused)}, which is no dataset of this trainer")
        self._policy_lm = self._ref_lm = None
        self._not_fused = "a PEFT model" if is_peft_model(self.model) else None
        if self._not_fused is None:
            self._policy_lm, self._not_fused = _checked_lm(self.model, self.accelerator.autocast())
        if self._not_fused is None and self.ref_model is not None:
            self._ref_lm, why = _checked_lm(self.accelerator.unwrap_model(self.ref_model), self.accelerator.autocast())
            self._not_fused = why and f"the reference model: {why}"
        self._not_fused = self._not_fused or self._unfused_option()
        if self._not_fused is None:
            _route(self.model)
        else:  # one warning, naming the cause
            logger.warning(f"prefrank: training with DPOTrainer's own loss: {self._not_fused}")

    def _unfused_option(self) -> str | None:
        """The option of this run that prefrank's fused loss does not compute, if any."""
        if len(self.loss_types) != 1 or self.loss_types[0] not in FUSED_LOSS_TYPES:
            return f"loss_type={self.loss_types} (the fused loss computes one of {', '.join(FUSED_LOSS_TYPES)})"
        return ("f_divergence_type=" + repr(self.f_divergence_type) if self.f_divergence_type != "reverse_kl" else
                f"ld_alpha={self.ld_alpha} (LD-DPO weights the tokens)" if self.ld_alpha is not None else
                "use_weighting=True (WPO weights the pairs)" if self.use_weighting else
                "router_aux_loss_coef: the MoE auxiliary loss" if self.aux_loss_enabled else None)

    # ------------------------------------------------------------ the reference, precomputed

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if dataset_name in self._ref_scores:
            if not args.precompute_ref_log_probs:
                raise ValueError("ref_scores gives precomputed reference log-probs: pass precompute_ref_log_probs=True")
            if not isinstance(dataset, Dataset):
                raise ValueError(f"ref_scores for {dataset_name}: needs a map-style Dataset (rows matched by position)")
            ids = dataset["id"] if "id" in dataset.column_names else [None] * len(dataset)
            self._row_ids[dataset_name] = [str(i) if v is None else str(v) for i, v in enumerate(ids)]
            # TRL drops rows whose prompt fills max_length: the index finds each kept row in the table
            dataset = dataset.map(lambda _, i: {ROW: i}, with_indices=True)
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if name in self._ref_scores:
            return self._from_table(dataset, name)
        lm, why = self._reference_lm()
        if lm is None:
            if isinstance(dataset, IterableDataset):
                raise ValueError(f"precompute_ref_log_probs with an IterableDataset runs through prefrank's scorer, "
                                 f"which cannot score this reference: {why}")
            logger.warning(f"prefrank: TRL's own reference precompute for {name}: {why}")
            return super()._precompute_ref_logps(dataset, name, batch_size)
        key = [self._reference_key(dataset, lm)]
        broadcast_object_list(key, from_process=0)  # one table for all ranks
        key = key[0]
        out = self._cache_dir(dataset) / f"ref-logps-{key[:24]}.parquet"
        if not out.exists():
            self._precompute(out, key, dataset, name, lm)
        table = trl_reference.read_table(out)
        if isinstance(dataset, Dataset) and len(table["id"]) != len(dataset):
            raise ValueError(f"{out}: {len(table['id'])} rows for a dataset of {len(dataset)}; remove it to recompute")
        return self._attach(dataset, table["id"], [table["logp_chosen"], table["logp_rejected"]])

    def _reference_lm(self) -> tuple[CausalLM | None, str | None]:
        """The model TRL's precompute scores (the reference, else the initial policy) as prefrank
        scores it, or why prefrank's precompute cannot stand in for TRL's."""
        why = ("a PEFT model" if is_peft_model(self.model) else
               "DeepSpeed / FSDP shard the model" if self.is_deepspeed_enabled or self.is_fsdp_enabled else
               "ld_alpha weights the tokens" if self.ld_alpha is not None else
               f"a custom data collator ({type(self.data_collator).__name__})"
               if type(self.data_collator) is not DataCollatorForPreference else None)
        if why is not None:
            return None, why
        return _checked_lm(self.accelerator.unwrap_model(self.ref_model or self.model), self.accelerator.autocast())

    def _reference_key(self, dataset, lm: CausalLM) -> str:
        """What decides the values: the data's token ids, the model (weights, config), TRL's
        truncation, the precision, prefrank's version, the parts' layout. The data is keyed by a
        digest of its token ids, not by datasets' fingerprint: TRL's preparation hashes the whole
        DPOConfig into that (its filter's closure), so a new learning rate would rescore."""
        parts = {"data": trl_reference.data_digest(dataset), "weights": self._precompute_model_hash,
                 "config": lm.config.to_json_string(),
                 "dtype": str(lm.weight.dtype), "mixed_precision": self.accelerator.mixed_precision,
                 "max_length": self.args.max_length, "truncation_mode": self.args.truncation_mode,
                 "prefrank": __version__, "chunk_rows": trl_reference.CHUNK_ROWS,
                 "deterministic": self._deterministic}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def _cache_dir(self, dataset) -> Path:
        if self._ref_cache_dir is not None:
            return Path(self._ref_cache_dir)
        if isinstance(dataset, Dataset) and dataset.cache_files:
            return Path(dataset.cache_files[0]["filename"]).parent
        return Path(self.args.output_dir) / "prefrank_ref_logps"

    def _precompute(self, out: Path, key: str, dataset, name: str, lm: CausalLM):
        sidecar = Sidecar(
            prefrank_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), key=key,
            what=f"reference log-probs of TRL's {name} dataset (logp_* are the reference's)",
            model={"class": type(lm.model).__name__, "name_or_path": lm.config.name_or_path,
                   "parameters": sum(p.numel() for p in lm.model.parameters())},
            trl={"max_length": self.args.max_length, "truncation_mode": self.args.truncation_mode,
                 "mixed_precision": self.accelerator.mixed_precision},
            table=trl_reference.TABLE)
        max_length = self.args.max_length
        logger.info(f"prefrank: scoring the reference log-probs of the {name} dataset -> {out}")
        with self.accelerator.autocast():  # the precision of TRL's own reference forward
            trl_reference.write_table(
                out, sidecar, dataset,
                lambda rows: trl_reference.score_rows(lm, self.data_collator, rows, max_length, self._deterministic),
                self.accelerator.process_index, self.accelerator.num_processes, self.accelerator.wait_for_everyone,
                len(dataset) if isinstance(dataset, Dataset) else None)

    def _from_table(self, dataset, name: str):
        path = self._ref_scores[name]
        tokens = []  # what TRL scores of each row
        for chunk in trl_reference.chunks(dataset):
            tokens += torch.tensor(trl_reference.collate_pairs(self.data_collator, chunk).tokens).view(-1, 2).tolist()
        values = trl_reference.reference_from_table(path, self._row_ids[name], dataset[ROW], tokens)
        logger.info(f"prefrank: the reference log-probs of the {name} dataset come from {path}")
        return self._attach(dataset.remove_columns(ROW), None, values.T.tolist())

    @staticmethod
    def _attach(dataset, ids, values):
        """The dataset with ref_chosen_logps / ref_rejected_logps: by position for a Dataset, by the
        rows' token ids for an IterableDataset (whose order may change from pass to pass)."""
        chosen, rejected = values
        if isinstance(dataset, IterableDataset):
            return dataset.map(functools.partial(_lookup, dict(zip(ids, zip(chosen, rejected)))))
        columns = Dataset.from_dict({"ref_chosen_logps": chosen, "ref_rejected_logps": rejected})
        return concatenate_datasets([dataset, columns], axis=1)

    # ------------------------------------------------------------ the training step

    def _fused_applies(self) -> bool:
        return self._not_fused is None and (self.precompute_ref_logps or self._ref_lm is not None)

    def _method(self, items) -> str | None:
        """packed or kv (scoring.resolve_method's choice), None if neither can run these items
        exactly. kv's cache does not survive gradient checkpointing (the layers drop it)."""
        lm = self._policy_lm
        method = resolve_method(lm, "auto", items)
        checkpointing = lm.model.training and torch.is_grad_enabled() and getattr(
            lm.model, "is_activation_checkpointing", False)
        if method == "kv" and checkpointing:
            method = "packed" if unsupported(lm, "packed", items) is None else "naive"
        return None if method == "naive" else method

    def _compute_loss(self, model, inputs, return_outputs):
        loss_type = self.loss_types[0]
        pairs = method = None
        if self._fused_applies():
            pairs = trl_reference.pair_items(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
        # a sequence with nothing scored, or (ipo) a first token counted in TRL's lengths but not scored
        if pairs is not None and 0 not in pairs.tokens and not (loss_type == "ipo" and pairs.context_free_start):
            method = self._method(pairs.items)
        if method is None:
            return super()._compute_loss(model, inputs, return_outputs)
        lm, device = self._policy_lm, inputs["input_ids"].device
        sequence = torch.tensor(pairs.sequence, device=device)

        def fused(lm, ref_chosen, ref_rejected):
            hidden, targets, completion = completion_hidden(lm, pairs.items, method)
            return fused_linear_dpo_loss(
                hidden, lm.weight, targets, sequence[completion], bias=lm.bias, ref_chosen_logps=ref_chosen,
                ref_rejected_logps=ref_rejected, beta=self.beta, loss_type=loss_type,
                # TRL's sigmoid loss ignores label_smoothing (cDPO is not in 1.16); robust uses it
                label_smoothing=self.label_smoothing if loss_type == "robust" else 0.0, softcap=lm.softcap,
                temperature=lm.temperature, sequence_stats=True)

        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:  # the policy's own computation on the reference, so that equal weights give equal sums,
            # in the precision of TRL's reference forward (the accelerator's autocast)
            with torch.no_grad(), self.accelerator.autocast():
                zeros = torch.zeros(len(pairs.tokens) // 2, dtype=torch.float64, device=device)
                ref_chosen, ref_rejected = fused(self._ref_lm, zeros, zeros)[1]["sequence_logps"].double().unbind(1)

        def step():
            loss, metrics = fused(lm, ref_chosen, ref_rejected)
            return loss * self.loss_weights[0], metrics

        loss, metrics = model(prefrank_step=step)
        self._log(inputs, metrics, ref_chosen, ref_rejected)
        if not return_outputs:
            return loss
        with torch.no_grad():  # as DPOTrainer: the logits for compute_metrics, from one more forward
            return loss, model(**{k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}, use_cache=False)

    def _log(self, inputs, metrics: dict, ref_chosen, ref_rejected):
        """The metrics DPOTrainer logs for these loss types, gathered over the ranks as it gathers
        them: the same collectives in the same order, shapes and dtypes, so a rank whose batch
        went to DPOTrainer's own step (see _compute_loss) still meets the others'."""
        mode = "train" if self.model.training else "eval"
        log = self._metrics[mode]
        gather, gather_all = self.accelerator.gather_for_metrics, self.accelerator.gather
        tokens, entropy, logits, top1 = (metrics[f"sequence_{k}"] for k in ("tokens", "entropy", "logits", "top1"))
        tokens = tokens.long()
        entropy_sum, total = gather(entropy.sum().float()).sum(), gather(tokens.sum()).sum()
        log["entropy"].append((entropy_sum / total).item() if total > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        log["num_tokens"] = [self._total_train_tokens]
        sums = [gather(x).sum().item() for k in (0, 1) for x in (logits[:, k].sum().float(), tokens[:, k].sum())]
        log["logits/chosen"].append(sums[0] / sums[1] if sums[1] > 0 else 0.0)
        log["logits/rejected"].append(sums[2] / sums[3] if sums[3] > 0 else 0.0)
        correct, total = gather(top1[:, 0].sum().long()).sum(), gather(tokens[:, 0].sum()).sum()
        log["mean_token_accuracy"].append((correct / total).item() if total > 0 else 0.0)
        logps = metrics["sequence_logps"].float()  # TRL's head sums in fp32
        chosen = self.beta * (logps[:, 0] - ref_chosen.float())
        rejected = self.beta * (logps[:, 1] - ref_rejected.float())
        log["rewards/chosen"].append(gather_all(chosen).mean().item())
        log["rewards/rejected"].append(gather_all(rejected).mean().item())
        log["rewards/accuracies"].append(gather_all((chosen > rejected).float()).mean().item())
        log["rewards/margins"].append(gather_all(chosen - rejected).mean().item())
        log["logps/chosen"].append(gather_all(logps[:, 0]).mean().item())
        log["logps/rejected"].append(gather_all(logps[:, 1]).mean().item())
