"""PrefrankDPOTrainer against TRL's own DPOTrainer (the same batches through both), and against
float64 computations written out here: the prefix-shared training step (loss, logged metrics,
gradients), the reference precompute (values, resume after kill -9, reuse, IterableDataset), a
score table as the reference, and DDP under torchrun."""
import gzip
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")

from conftest import HH, STORIES, needs_shared  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

FUSED = ["sigmoid", "ipo", "robust", "hinge"]
WORKER = Path(__file__).parent / "trl_worker.py"


def varied_rows(n: int, seed: int) -> list[dict]:
    """Addition-task rows of varied lengths: 1-3 questions as the prompt, answers of 1-12 digits."""
    from prefrank.demo.task import make_pairs
    rng = random.Random(seed)
    rows = []
    for i, r in enumerate(make_pairs(n, seed=seed)):
        prompt = "".join(q["prompt"] + q["chosen"] + "\n" for q in make_pairs(rng.randint(0, 2), seed=seed + i))
        digits = lambda: "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 12)))  # noqa: E731
        rows.append({"prompt": prompt + r["prompt"], "chosen": " " + digits(), "rejected": " " + digits()})
    return rows


def config(tmp_path, **options):
    from trl import DPOConfig
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, beta=0.2, report_to=[],
                    use_cpu=True, dataloader_num_workers=0, save_strategy="no", logging_steps=1,
                    bf16=False)  # TRL defaults to bf16 autocast
    return DPOConfig(**{**defaults, **options})


def trainer(cls, model, rows, tmp_path, ref_model=None, **options):
    from datasets import Dataset

    from prefrank.demo.default import build_tokenizer
    return cls(model=model, ref_model=ref_model, args=config(tmp_path, **options),
               train_dataset=Dataset.from_list(rows), processing_class=build_tokenizer())


@pytest.fixture
def spy(monkeypatch):
    """The methods with which the prefix-shared step's passes ran: two a step with a reference model
    (the reference's, then the policy's, through the same code), one with a precomputed reference."""
    from prefrank.dpo import trl_trainer
    calls, real = [], trl_trainer.completion_hidden

    def recording(lm, items, method):
        calls.append(method)
        return real(lm, items, method)

    monkeypatch.setattr(trl_trainer, "completion_hidden", recording)
    return calls


def one_step(tr, model):
    batch = next(iter(tr.get_train_dataloader()))
    model.train()
    loss = tr.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, {k: v[-1] for k, v in tr._metrics["train"].items()}


def assert_equal_steps(ours, theirs, loss_rel, grad_rel, metric_abs):
    """Metrics to `metric_abs` absolute (and as much relative): rewards and margins are
    differences of sums of ~30 nats that TRL adds up in fp32."""
    (our_loss, our_grads, our_metrics), (trl_loss, trl_grads, trl_metrics) = ours, theirs
    assert our_loss == pytest.approx(trl_loss, rel=loss_rel)
    assert set(our_metrics) == set(trl_metrics)
    for name, value in trl_metrics.items():
        assert our_metrics[name] == pytest.approx(value, rel=metric_abs, abs=metric_abs), name
    assert set(our_grads) == set(trl_grads)
    for name, g in trl_grads.items():
        err = (our_grads[name] - g).abs().max().item()
        assert err <= grad_rel * g.abs().max().item() + 1e-12, (name, err, g.abs().max().item())


# ---------------------------------------------------------------- the training step

@pytest.mark.parametrize("loss_type", FUSED)
@pytest.mark.parametrize("reference", ["model", "precompute"])
@pytest.mark.parametrize("method", ["packed", "kv"])
def test_prefix_shared_step_equals_trl(loss_type, reference, method, tmp_path, spy, monkeypatch):
    """float64 random-init Llama, rows of varied lengths, some cut by max_length: prefrank's step
    (each prompt once) gives TRL's loss, logged metrics and gradients. TRL's chunked head computes
    log-probs in fp32 even for float64 models (and Llama's RMSNorm runs in fp32): agreement to
    ~1e-6 relative; the float64 test below checks exactness."""
    from trl import DPOTrainer

    from prefrank.dpo import trl_trainer
    monkeypatch.setattr(trl_trainer, "resolve_method", lambda lm, m, items: method)
    rows = varied_rows(8, seed=3)
    results = []
    for cls in (DPOTrainer, trl_trainer.PrefrankDPOTrainer):
        model, ref = tiny_model("llama").double(), tiny_model("llama", seed=1).double()
        tr = trainer(cls, model, rows, tmp_path / cls.__name__, ref_model=ref, loss_type=[loss_type],
                     label_smoothing=0.1, precompute_ref_log_probs=reference == "precompute", max_length=40,
                     gradient_checkpointing=method == "packed")  # kv's cache does not survive checkpointing
        results.append(one_step(tr, model))
    assert spy == [method] * (1 if reference == "precompute" else 2)
    assert_equal_steps(results[1], results[0], loss_rel=1e-6, grad_rel=1e-5, metric_abs=1e-5)


def oracle_loss(model, ref, batch, loss_type, beta, label_smoothing):
    """DPO loss of a TRL batch in float64, independently: each sequence's full forward (no prefix
    sharing), log_softmax, the completion tokens' sum; the loss formulas of TRL 1.16."""
    import torch.nn.functional as F
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    scored = completion[:, 1:].bool()
    sums = []
    for m in (model, ref):
        logp = torch.log_softmax(m(input_ids=ids, attention_mask=mask).logits[:, :-1].double(), -1)
        sums.append(torch.where(scored, logp.gather(2, ids[:, 1:, None]).squeeze(2), 0.0).sum(1))
    (pc, pr), (rc, rr) = sums[0].chunk(2), sums[1].chunk(2)
    if loss_type == "ipo":
        nc, nr = completion.sum(1).chunk(2)
        x = (pc - rc) / nc - (pr - rr) / nr
        return ((x - 1 / (2 * beta)) ** 2).mean()
    x = beta * ((pc - rc) - (pr - rr))
    return {"sigmoid": -F.logsigmoid(x), "hinge": torch.relu(1 - x),
            "robust": (-(1 - label_smoothing) * F.logsigmoid(x) + label_smoothing * F.logsigmoid(-x))
            / (1 - 2 * label_smoothing)}[loss_type].mean()


@pytest.mark.parametrize("loss_type", FUSED)
@pytest.mark.parametrize("method", ["packed", "kv"])
def test_prefix_shared_step_is_exact_in_float64(loss_type, method, tmp_path, spy, monkeypatch):
    """float64 GPT-2 (no fp32 islands): loss and every gradient equal the unshared float64 oracle
    to 1e-10."""
    from prefrank.dpo import trl_trainer
    monkeypatch.setattr(trl_trainer, "resolve_method", lambda lm, m, items: method)
    model, ref = tiny_model("gpt2").double(), tiny_model("gpt2", seed=1).double()
    tr = trainer(trl_trainer.PrefrankDPOTrainer, model, varied_rows(8, seed=4), tmp_path, ref_model=ref,
                 loss_type=[loss_type], label_smoothing=0.1, max_length=40, gradient_checkpointing=False)
    batch = next(iter(tr.get_train_dataloader()))
    model.train()
    ours = tr.compute_loss(model, batch)
    our_grads = torch.autograd.grad(ours, list(model.parameters()))
    expected = oracle_loss(model, ref, batch, loss_type, 0.2, 0.1)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    assert spy == [method, method]
    assert ours.item() == pytest.approx(expected.item(), rel=1e-10)
    for g, e in zip(our_grads, expected_grads):
        assert (g - e).abs().max().item() <= 1e-10 * e.abs().max().item() + 1e-14


@needs_shared
@pytest.mark.parametrize("loss_type", FUSED)
def test_prefix_shared_step_equals_trl_on_stories260k(loss_type, tmp_path, spy):
    """The real model (fp32) on real HH pairs, cut at 160 tokens: TRL's loss, metrics and
    gradients within fp32 rounding. The reference is the model as trained; the policy is it
    moved a little (so the rewards are not all zero)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from prefrank.dpo.trl_trainer import PrefrankDPOTrainer
    lines = gzip.open(HH / "helpful-base" / "test.jsonl.gz", "rt").readlines()[:8]
    rows = Dataset.from_list([json.loads(line) for line in lines])
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    results = []
    for cls in (DPOTrainer, PrefrankDPOTrainer):
        model, ref = (AutoModelForCausalLM.from_pretrained(STORIES) for _ in range(2))
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        tr = cls(model=model, ref_model=ref, args=config(tmp_path / cls.__name__, loss_type=[loss_type],
                                                         label_smoothing=0.1, max_length=160),
                 train_dataset=rows, processing_class=tokenizer)
        results.append(one_step(tr, model))
    assert len(spy) == 2  # the reference's pass and the policy's
    assert_equal_steps(results[1], results[0], loss_rel=1e-5, grad_rel=1e-4, metric_abs=1e-4)


def test_sigmoid_ignores_label_smoothing_as_trl_does(tmp_path, spy):
    """TRL 1.16's sigmoid loss has no label smoothing (cDPO is not in it): the drop-in must not add it."""
    from trl import DPOTrainer

    from prefrank.dpo.trl_trainer import PrefrankDPOTrainer
    losses = []
    for cls in (DPOTrainer, PrefrankDPOTrainer):
        model = tiny_model("llama")
        tr = trainer(cls, model, varied_rows(8, seed=5), tmp_path / cls.__name__, ref_model=tiny_model("llama", seed=1),
                     loss_type=["sigmoid"], label_smoothing=0.3)
        losses.append(one_step(tr, model)[0])
    assert len(spy) == 2
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_evaluate_equals_trl(tmp_path, spy):
    """trainer.evaluate() (compute_loss with return_outputs, as Trainer's evaluation asks): the
    same loss and metrics as DPOTrainer's."""
    from datasets import Dataset
    from trl import DPOTrainer

    from prefrank.demo.default import build_tokenizer
    from prefrank.dpo.trl_trainer import PrefrankDPOTrainer
    rows = varied_rows(12, seed=6)
    results = []
    for cls in (DPOTrainer, PrefrankDPOTrainer):
        tr = cls(model=tiny_model("llama").double(), ref_model=tiny_model("llama", seed=1).double(),
                 args=config(tmp_path / cls.__name__, per_device_eval_batch_size=4, loss_type=["robust"],
                             label_smoothing=0.1),
                 train_dataset=Dataset.from_list(rows[:4]), eval_dataset=Dataset.from_list(rows),
                 processing_class=build_tokenizer())
        results.append(tr.evaluate())
    assert len(spy) == 6  # 3 evaluation batches, each the reference's pass and the policy's
    for name, value in results[0].items():
        if not name.endswith(("runtime", "per_second")):
            assert results[1][name] == pytest.approx(value, rel=1e-5, abs=1e-5), name  # TRL's fp32 sums


def test_drop_in_runs_under_trl_defaults(tmp_path, spy):
    """TRL's defaults (bf16 autocast, gradient checkpointing), precomputed reference: trains through
    the prefix-shared step, finite and moving."""
    from datasets import Dataset
    from trl import DPOConfig

    from prefrank.demo.default import build_tokenizer
    from prefrank.dpo.trl_trainer import PrefrankDPOTrainer
    model = tiny_model("llama")
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[], use_cpu=True,
                     save_strategy="no", precompute_ref_log_probs=True)
    tr = PrefrankDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(varied_rows(8, seed=3)),
                            processing_class=build_tokenizer())
    before = [p.detach().clone() for p in model.parameters()]
    tr.train()
    assert spy == ["packed", "packed"]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- the reference, precomputed

def reference_columns(tr) -> torch.Tensor:
    ds = tr.train_dataset
    return torch.tensor([ds["ref_chosen_logps"], ds["ref_rejected_logps"]], dtype=torch.float64).T


@pytest.mark.parametrize("truncation", [("keep_start", 40), ("keep_end", 30), ("keep_end", 3)])
def test_precompute_equals_trl_and_is_reused(truncation, tmp_path, monkeypatch):
    """Over several parts (7 rows each), with TRL's truncation (keep_end 3 cuts whole prompts: the
    first completion token has no context): the values TRL's own precompute gives, within fp32
    rounding. A second trainer on the same data and model (other training options) reuses the
    table without scoring."""
    from trl import DPOTrainer

    from prefrank.dpo import trl_reference
    from prefrank.dpo.trl_trainer import PrefrankDPOTrainer
    monkeypatch.setattr(trl_reference, "CHUNK_ROWS", 7)
    monkeypatch.setattr(trl_reference, "COLLATE_ROWS", 3)
    mode, max_length = truncation
    rows = varied_rows(40, seed=8)
    options = dict(precompute_ref_log_probs=True, max_length=max_length, truncation_mode=mode)
    theirs = reference_columns(trainer(DPOTrainer, tiny_model("llama"), rows, tmp_path / "trl", **options))
    real, parts = trl_reference.score_rows, []
    monkeypatch.setattr(trl_reference, "score_rows", lambda *a: parts.append(len(a[2])) or real(*a))
    ours = reference_columns(trainer(PrefrankDPOTrainer, tiny_model("llama"), rows, tmp_path / "ours", **options))
    assert theirs.shape == ours.shape and theirs.shape[0] > 20
    assert sum(parts) == len(ours) and max(parts) == 7 and len(parts) == -(-len(ours) // 7)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    scored = []
    monkeypatch.setattr(trl_reference, "score_rows", lambda *a: scored.append(a) or pytest.fail("rescored"))
    again = reference_columns(trainer(PrefrankDPOTrainer, tiny_model("llama"), rows, tmp_path / "ours", **options,
                                      learning_rate=3e-4, beta=0.5))  # the reference does not depend on these
    assert torch.equal(again, ours) and not scored
    assert len(list((tmp_path / "ours" / "prefrank_ref_logps").glob("ref-logps-*.parquet"))) == 1


def test_precompute_for_an_iterable_dataset(tmp_path, monkeypatch):
    """TRL refuses precompute_ref_log_probs with an IterableDataset; prefrank streams it in parts:
    the values of the map-style run, row for row, and training reads them."""
    from datasets import Dataset
    from trl import DPOTrainer

    from prefrank.demo.default import build_tokenizer
    from prefrank.dpo import trl_reference
    from prefrank.dpo.trl_trainer import PrefrankDPOTrainer
    monkeypatch.setattr(trl_reference, "CHUNK_ROWS", 7)
    rows = varied_rows(30, seed=9)
    options = dict(precompute_ref_log_probs=True, max_steps=2, per_device_train_batch_size=4)
    mapped = reference_columns(trainer(PrefrankDPOTrainer, tiny_model("llama"), rows, tmp_path / "map", **options))
    streamed = Dataset.from_list(rows).to_iterable_dataset()
    with pytest.raises(ValueError, match="IterableDataset"):
        DPOTrainer(model=tiny_model("llama"), args=config(tmp_path / "trl", **options), train_dataset=streamed,
                   processing_class=build_tokenizer())
    tr = PrefrankDPOTrainer(model=tiny_model("llama"), args=config(tmp_path / "stream", **options),
                            train_dataset=streamed, processing_class=build_tokenizer())
    got = torch.tensor([[r["ref_chosen_logps"], r["ref_rejected_logps"]] for r in tr.train_dataset], dtype=torch.float64)
    assert torch.equal(got, mapped)
    tr.train()
    assert tr.state.global_step == 2


def test_precompute_resumes_after_kill_9(tmp_path, monkeypatch):
    """A precompute killed with SIGKILL mid-way continues from its complete parts (it scores only
    the rest) and gives the values of an uninterrupted run, bit for bit (same parts)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import trl_worker
    from prefrank.demo.default import build_tokenizer
    from prefrank.dpo import trl_reference
    from prefrank.dpo.trl_trainer import PrefrankDPOTrainer
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(WORKER), "precompute", str(out), str(model_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / "prefrank_ref_logps"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("*.parts/part-*.parquet"))) < 8:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # a part counts once its record is written too (a kill between the two leaves it to be rescored)
    written = sum(p.with_suffix(".json").exists() for p in parts.glob("*.parts/part-*.parquet"))
    assert written >= 7 and not list(parts.glob("*.parquet")), "killed before the end, with parts on disk"

    monkeypatch.setattr(trl_reference, "CHUNK_ROWS", 2)
    real, scored = trl_reference.score_rows, []
    monkeypatch.setattr(trl_reference, "score_rows", lambda *a: scored.append(1) or real(*a))

    def run(output_dir):
        return reference_columns(PrefrankDPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir), args=config(output_dir, precompute_ref_log_probs=True),
            train_dataset=Dataset.from_list(trl_worker.pair_rows(600, seed=11)),
            processing_class=AutoTokenizer.from_pretrained(model_dir)))  # as the worker: the same fingerprint

    resumed = run(out)
    assert 0 < len(scored) <= 300 - written
    assert torch.equal(resumed, run(tmp_path / "clean"))


# ---------------------------------------------------------------- a score table as the reference

def test_score_table_is_the_reference(tmp_path):
    """`prefrank score --tokenization trl` once, the table serves as the reference: it equals the
    precompute and TRL's own, also when TRL drops rows whose prompt fills max_length (rows are
    matched by their index); tables of other rows or other tokens are refused."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer

    from prefrank.cli import main
    from prefrank.demo.default import build_tokenizer
    from prefrank.demo.task import make_pairs
    from prefrank.dpo.trl_trainer import PrefrankDPOTrainer
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in make_pairs(20, seed=12)]
    for i in (2, 9):  # prompts of ~45 tokens: TRL drops them at max_length 40; the others fit whole
        pairs[i]["prompt"] = pairs[i]["prompt"] * 3
    tied = [dict(r) for r in pairs]
    tied[5]["rejected"] = tied[5]["chosen"]  # an error row for prefrank, a pair for TRL
    voted = [{**r, "alpha": 0.2 if i == 3 else 0.9} for i, r in enumerate(pairs)]  # row 3: raters preferred rejected
    sources = {"pairs": pairs, "tied": tied, "voted": voted}
    for name, rows in sources.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tables = {}
    options = {"trl": ("pairs", ["--tokenization", "trl"]), "joint": ("pairs", []),
               "short": ("pairs", ["--tokenization", "trl", "--limit", "19"]),
               "tied": ("tied", ["--tokenization", "trl"]), "voted": ("voted", ["--tokenization", "trl"])}
    for name, (source, extra) in options.items():
        tables[name] = tmp_path / f"{name}.parquet"
        assert main(["score", "--data", str(tmp_path / f"{source}.jsonl"), "--model", str(model_dir),
                     "--out", str(tables[name]), *extra]) == 0

    def build(cls, dataset=None, **kwargs):
        return cls(model=AutoModelForCausalLM.from_pretrained(model_dir),
                   args=config(tmp_path / cls.__name__, precompute_ref_log_probs=True, max_length=40),
                   train_dataset=dataset or Dataset.from_list(pairs), processing_class=build_tokenizer(), **kwargs)

    from_table = reference_columns(build(PrefrankDPOTrainer, ref_scores=str(tables["trl"])))
    precomputed = reference_columns(build(PrefrankDPOTrainer))
    theirs = reference_columns(build(DPOTrainer))
    assert from_table.shape == (18, 2)
    torch.testing.assert_close(from_table, precomputed, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(from_table, theirs, rtol=1e-5, atol=1e-4)

    with pytest.raises(ValueError, match="19 rows for a dataset of 20"):
        build(PrefrankDPOTrainer, ref_scores=str(tables["short"]))
    with pytest.raises(ValueError, match=r"row 0 has id '0' where the dataset's is 'pair-0'"):
        build(PrefrankDPOTrainer, ref_scores=str(tables["trl"]),
              dataset=Dataset.from_list([{"id": f"pair-{i}", **r} for i, r in enumerate(pairs)]))
    with pytest.raises(ValueError, match="chosen / .* rejected tokens where TRL scores"):
        build(PrefrankDPOTrainer, ref_scores=str(tables["joint"]))
    with pytest.raises(ValueError, match=r"row 5 \(id '5'\) is an error row in the table \(chosen and rejected are "):
        build(PrefrankDPOTrainer, ref_scores=str(tables["tied"]), dataset=Dataset.from_list(tied))
    with pytest.raises(ValueError, match=r"row 3 \(id '3'\) was reoriented to its raters' choice"):
        build(PrefrankDPOTrainer, ref_scores=str(tables["voted"]), dataset=Dataset.from_list(voted))
    with pytest.raises(ValueError, match="precompute_ref_log_probs=True"):
        PrefrankDPOTrainer(model=tiny_model("llama"), args=config(tmp_path / "x"), ref_scores=str(tables["trl"]),
                           train_dataset=Dataset.from_list(pairs), processing_class=build_tokenizer())


# ---------------------------------------------------------------- torchrun

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_train_like_one_process(tmp_path):
    """torchrun, 2 gloo ranks, float64, 3 AdamW steps with a global batch of 8 pairs: every
    parameter is identical on both ranks and equals one process with batch 8, with and without
    gradient accumulation; the precompute (its parts shared among the ranks) equals one
    process's. (Running the decoder outside DDP's forward, as the drop-in did before, left all
    21 parameters different across the ranks.)"""
    import trl_worker
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(WORKER), "ddp", str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    start = tiny_model("llama").double().state_dict()
    for name, _, _, precompute, checkpointing in trl_worker.DDP_CONFIGS:
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in (0, 1)]
        params, ref_logps, losses = trl_worker.train(str(tmp_path / f"single-{name}"), 8, 1, precompute, checkpointing)
        for p, value in params.items():
            assert torch.equal(ranks[0]["params"][p], ranks[1]["params"][p]), (name, p)
            torch.testing.assert_close(ranks[0]["params"][p], value, rtol=0, atol=1e-12, msg=f"{name} {p}")
            assert not torch.equal(value, start[p]), (name, p)
        assert ranks[0]["losses"] == pytest.approx(losses, rel=1e-6)
        if precompute:
            assert torch.equal(ranks[0]["ref_logps"], ref_logps) and torch.equal(ranks[1]["ref_logps"], ref_logps)


def test_a_policy_equal_to_its_reference_has_zero_margins(tmp_path):
    """The reference model goes through the policy's own computation in the same batch: at the first
    step (policy = reference) every reward and margin is exactly 0, as in TRL (the scorer's batches
    gave ±3e-7, a rewards/accuracies of 0.25; tryout)."""
    import copy

    from trl import DPOTrainer

    from prefrank.dpo.trl_trainer import PrefrankDPOTrainer
    rows = varied_rows(16, seed=3)
    logged = []
    for cls in (DPOTrainer, PrefrankDPOTrainer):
        model = tiny_model("llama")
        tr = trainer(cls, model, rows, tmp_path / cls.__name__, ref_model=copy.deepcopy(model))
        logged.append({k: v for k, v in one_step(tr, model)[2].items() if k.startswith("rewards/")})
    assert logged[1] == logged[0] == {"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/accuracies": 0.0,
                                      "rewards/margins": 0.0}


# ---------------------------------------------------------------- TRL's default configuration

@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny random-init Llama saved as a folder: TRL builds its reference model from the policy's path."""
    folder = tmp_path_factory.mktemp("llama")
    tiny_model("llama").save_pretrained(folder)
    return str(folder)


def train_with_defaults(cls, folder, tmp_path, **options):
    """Two steps of `cls` with DPOConfig's defaults (bf16 autocast, gradient checkpointing, dropout
    off, β = 0.1) but for the output, the batch and plain SGD (whose update is the gradient: AdamW's
    first steps are about lr · sign(gradient), which magnifies noise on near-zero gradients): the
    loss at each step, the initial and the final weights."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    from prefrank.demo.default import build_tokenizer
    model = AutoModelForCausalLM.from_pretrained(folder)
    ref_model = AutoModelForCausalLM.from_pretrained(folder) if options.pop("ref_model") else None
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, optim="sgd",
                     learning_rate=1.0, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, **options)
    tr = cls(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(varied_rows(8, seed=3)),
             processing_class=build_tokenizer())
    tr.train()
    losses = [line["loss"] for line in tr.state.log_history if "loss" in line]
    return losses, initial, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("ref_model", [True, False])
@pytest.mark.parametrize("precompute", [True, False])
def test_trl_defaults_train_through_the_fused_loss(bf16, ref_model, precompute, model_folder, tmp_path, monkeypatch):
    """DPOConfig's defaults (bf16 autocast) with a model loaded from a folder: every step goes through
    prefrank's fused loss (the head check failed in bf16 and DPOTrainer's own loss trained: 0 calls),
    and the losses and final weights equal DPOTrainer's to the precision's rounding."""
    from trl import DPOTrainer

    from prefrank.dpo import trl_trainer
    calls, real = [], trl_trainer.fused_linear_dpo_loss

    def counting(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(trl_trainer, "fused_linear_dpo_loss", counting)
    options = dict(bf16=bf16, ref_model=ref_model, precompute_ref_log_probs=precompute)
    theirs = train_with_defaults(DPOTrainer, model_folder, tmp_path / "trl", **options)
    ours = train_with_defaults(trl_trainer.PrefrankDPOTrainer, model_folder, tmp_path / "prefrank", **options)
    # a step: the policy's pass (with gradients), and before it the reference's unless precomputed
    assert calls == ([True] if precompute else [False, True]) * 2
    eps = torch.finfo(torch.bfloat16 if bf16 else torch.float32).eps
    loss_err = max(abs(a - b) for a, b in zip(ours[0], theirs[0]))
    # the weights' difference relative to how far training moved them
    weight_err = max(((ours[2][n] - w).abs().max() / (w - theirs[1][n]).abs().max()).item()
                     for n, w in theirs[2].items())
    print(f"bf16={bf16}: losses {ours[0]} vs {theirs[0]} (max diff {loss_err:.3g}); weights max rel diff "
          f"{weight_err:.3g}")
    assert len(ours[0]) == len(theirs[0]) == 2
    # the loss (~0.6) to a few roundings; the weights' change: bf16 to the gradients' rounding (7.5 eps
    # measured), fp32 to the sums over tokens taken in other orders (1e-5 measured)
    assert loss_err <= 4 * eps and weight_err <= max(16 * eps, 1e-4)


@pytest.mark.parametrize("cause", ["loss_type", "head"])
def test_a_fallback_is_one_warning_naming_its_cause(cause, tmp_path, caplog):
    """When DPOTrainer's own loss must train, the trainer says so once, with the cause: an option the
    fused loss does not compute, or a model whose logits are not its head (logit_scale on a model
    that does not apply it)."""
    from prefrank.dpo.trl_trainer import PrefrankDPOTrainer
    model, options = tiny_model("llama"), {}
    if cause == "loss_type":
        options["loss_type"] = ["bco_pair"]
    else:
        model.config.logit_scale = 2.0
    with caplog.at_level("WARNING"):
        trainer(PrefrankDPOTrainer, model, varied_rows(4, seed=1), tmp_path, ref_model=tiny_model("llama", seed=1),
                **options)
    ours = [r.getMessage() for r in caplog.records if "prefrank" in r.getMessage()]
    print(ours)
    assert len(ours) == 1 and "training with DPOTrainer's own loss" in ours[0]
    assert ("loss_type=['bco_pair']" if cause == "loss_type" else "its logits are not (hidden @ lm_head)") in ours[0]
