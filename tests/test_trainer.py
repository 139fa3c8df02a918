"""The DPO trainer: the shared-prompt step equals the unshared loss and gradients (float64), training
lowers the loss on real pairs, and a resumed run equals an uninterrupted one."""
import gzip
import json
import os

import pytest
import torch

from conftest import HH, STORIES, needs_shared
from prefrank.data import Columns
from prefrank.dpo.trainer import TrainOptions, dpo_step_loss, train
from prefrank.models import CausalLM
from prefrank.scoring import score
from prefrank.tokenization import Tokenized
from tiny_models import VOCAB, tiny_model


def unshared_dpo_loss(model, items, ref_c, ref_r, beta):
    """Each prompt + completion run alone through the model's full forward; DPO written out."""
    sums = []
    for it in items:
        for c in it.completion_ids:
            logits = model(input_ids=torch.tensor([it.prompt_ids + c])).logits[0]
            logp = torch.log_softmax(logits, -1)
            p = len(it.prompt_ids)
            sums.append(logp[torch.arange(p - 1, p - 1 + len(c)), torch.tensor(c)].sum())
    sums = torch.stack(sums)
    z = (sums[0::2] - sums[1::2]) - (ref_c - ref_r)
    return torch.log1p(torch.exp(-beta * z)).mean()


# GPT-2 computes in float64 throughout: equal to rounding. Llama's RMSNorm and rotary embedding
# compute in float32 even for a float64 model, so batching changes its results at that level.
@pytest.mark.parametrize("arch, rtol", [("gpt2", 1e-10), ("llama", 1e-6)])
def test_shared_prompt_step_equals_unshared(arch, rtol):
    model = tiny_model(arch).double()
    g = torch.Generator().manual_seed(4)
    items = []
    for n_prompt, n_c, n_r in [(5, 3, 1), (1, 4, 6), (9, 2, 2)]:
        items.append(Tokenized(torch.randint(0, VOCAB, (n_prompt,), generator=g).tolist(),
                               [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (n_c, n_r)]))
    ref_c, ref_r = torch.randn(3, generator=g, dtype=torch.float64) - 10, torch.randn(3, generator=g, dtype=torch.float64) - 10
    opts = TrainOptions(model="unused", data="unused", out="unused", beta=0.3)
    loss, _ = dpo_step_loss(CausalLM(model), items, ref_c, ref_r, opts)
    loss.backward()
    shared = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = unshared_dpo_loss(model, items, ref_c, ref_r, 0.3)
    expected.backward()
    print(f"{arch}: loss {loss.item():.10f} vs {expected.item():.10f}")
    assert loss.item() == pytest.approx(expected.item(), rel=rtol)
    for name, p in model.named_parameters():
        err = (shared[name] - p.grad).abs().max().item()
        assert err <= rtol * max(1.0, p.grad.abs().max().item()), (name, err)


@pytest.fixture(scope="module")
def hh_pairs(tmp_path_factory):
    rows = [json.loads(line) for line in gzip.open(HH / "helpful-base" / "test.jsonl.gz", "rt")]
    def blank_answer(r):  # what follows the last shared "Assistant:" is only whitespace: an error row
        cut = os.path.commonprefix([r["chosen"], r["rejected"]]).rfind("\n\nAssistant:") + len("\n\nAssistant:")
        return not r["chosen"][cut:].strip() or not r["rejected"][cut:].strip()
    rows = [r for r in rows if len(r["chosen"]) + len(r["rejected"]) < 900 and not blank_answer(r)][:48]
    path = tmp_path_factory.mktemp("hh") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def metrics_lines(out):
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in open(out / "metrics.jsonl")]


@needs_shared
def test_training_lowers_the_dpo_loss_on_real_pairs(hh_pairs, tmp_path):
    opts = TrainOptions(model=str(STORIES), data=hh_pairs, out=str(tmp_path / "run"), lr=3e-3, batch_size=8,
                        eval_every=4, max_steps=8, epochs=3, eval_pairs=32, val_fraction=0.25, max_length=512,
                        truncate="keep-end", device="cpu")
    train(opts, log=lambda m: None)
    lines = metrics_lines(tmp_path / "run")
    assert [line["step"] for line in lines] == [0, 4, 8]
    first, last = lines[0]["train"], lines[-1]["train"]
    assert first["dpo_loss"] == pytest.approx(0.6931, abs=1e-3)  # the policy starts as the reference
    for split in ("train", "val"):  # exactly: same weights, same batches (not ±1e-7 counted as reward accuracy)
        start = lines[0][split]
        assert start["reward_accuracy"] == 0.0 and all(g["mean_margin"] in (0.0, None) for g in start["groups"])
    assert last["dpo_loss"] < first["dpo_loss"] - 0.01 and lines[-1]["param_sq_distance"] > 0
    assert sum(g["count"] for g in last["groups"]) == 32
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


@needs_shared
def test_resume_equals_an_uninterrupted_run(hh_pairs, tmp_path):
    common = dict(model=str(STORIES), data=hh_pairs, lr=3e-3, batch_size=4, grad_accum=2, eval_every=2,
                  eval_pairs=16, max_length=512, truncate="keep-end", device="cpu", optimizer="rmsprop")
    train(TrainOptions(out=str(tmp_path / "a"), max_steps=4, **common), log=lambda m: None)
    train(TrainOptions(out=str(tmp_path / "b"), max_steps=2, **common), log=lambda m: None)
    train(TrainOptions(out=str(tmp_path / "b"), max_steps=4, resume=True, **common), log=lambda m: None)
    assert metrics_lines(tmp_path / "a") == metrics_lines(tmp_path / "b")
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / d / "final" / "model.safetensors") for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_raises_the_chosen_likelihood(default_cache, tmp_path):
    """From a random model, a few SFT steps on the built-in task raise the chosen completions'
    log-likelihood (scored independently, before and after)."""
    from prefrank.data import read_examples
    from prefrank.demo.default import build_tokenizer
    from prefrank.models import load_model
    from prefrank.scoring import score
    from prefrank.tokenization import tokenize_example
    data, _ = default_cache
    start = tmp_path / "random"
    tiny_model("llama").save_pretrained(start)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(start)
    opts = TrainOptions(model=str(start), data=data, out=str(tmp_path / "sft"), mode="sft", lr=3e-3, batch_size=16,
                        eval_every=10, max_steps=10, device="cpu", columns=Columns())
    train(opts, log=lambda m: None)
    items = [tokenize_example(ex, tokenizer) for ex in list(read_examples(data, Columns()))[:64]]
    cpu = torch.device("cpu")
    before = score(CausalLM(load_model(str(start), dtype=torch.float32, device=cpu)), items).logps
    after = score(CausalLM(load_model(str(tmp_path / "sft" / "final"), dtype=torch.float32, device=cpu)), items).logps
    print(f"mean chosen log-likelihood: {before[0::2].mean():.3f} -> {after[0::2].mean():.3f}")
    assert after[0::2].mean() > before[0::2].mean() + 1.0
    nll = [line["train"]["chosen_nll_per_token"] for line in metrics_lines(tmp_path / "sft")]  # what SFT lowers
    assert len(nll) == 2 and nll[1] < nll[0]


def test_train_cli_on_the_builtin_task(default_cache, tmp_path, capsys):
    from prefrank.cli import main
    data, model = default_cache
    out = tmp_path / "run"
    assert main(["train", "--model", model, "--data", data, "--out", str(out), "--lr", "1e-3", "--max-steps", "2",
                 "--eval-every", "1", "--eval-pairs", "16", "--loss-type", "ipo", "--beta", "0.5"]) == 0
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [0, 1, 2]
    assert main(["train", "--model", model, "--data", data, "--out", str(out)]) == 2
    assert "pass --resume" in capsys.readouterr().err


@needs_shared
def test_two_gloo_processes_train_like_one(hh_pairs, tmp_path):
    """torchrun with 2 ranks and batch 4 each equals one process with batch 8, step for step. (A
    small learning rate: Adam's first steps turn rounding-level gradient differences on near-zero
    components into full-size updates, and a large rate would magnify them past the tolerance.)"""
    import os
    import socket
    import subprocess
    import sys
    common = ["train", "--model", str(STORIES), "--data", hh_pairs, "--lr", "3e-4", "--max-steps", "3",
              "--eval-every", "1", "--eval-pairs", "16", "--max-length", "512", "--truncate", "keep-end",
              "--device", "cpu"]
    from prefrank.cli import main
    assert main([*common, "--out", str(tmp_path / "one"), "--batch-size", "8"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                             "127.0.0.1", "--master-port", str(port), "-m", "prefrank", *common,
                             "--out", str(tmp_path / "two"), "--batch-size", "4"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = metrics_lines(tmp_path / "one"), metrics_lines(tmp_path / "two")
    assert [line["step"] for line in two] == [0, 1, 2, 3]
    for a, b in zip(one, two):
        assert a["train"]["ranking_accuracy"] == b["train"]["ranking_accuracy"]
        assert a["train"]["dpo_loss"] == pytest.approx(b["train"]["dpo_loss"], rel=1e-5, abs=1e-7)
        assert a["param_sq_distance"] == pytest.approx(b["param_sq_distance"], rel=1e-4, abs=1e-9)


def hand_win_rate(reward_model, reward_tokenizer, prompts, policy_texts, reference_texts) -> tuple[float, list]:
    """The judge's rule written out: each prompt + completion scored alone (no batch, no padding) by
    the reward model's body and score head at its last token; the policy wins a prompt when its
    reward is higher, ties count half. Also returns the (policy, reference) rewards."""
    def reward(text):
        ids = torch.tensor([reward_tokenizer(text)["input_ids"]])
        with torch.no_grad():
            return reward_model.score(reward_model.model(input_ids=ids).last_hidden_state[0, -1]).item()

    pairs = [(reward(p + a), reward(p + b)) for p, a, b in zip(prompts, policy_texts, reference_texts)]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs), pairs


def test_reward_model_judge(default_cache, tmp_path, capsys):
    """A reward model's win rate: exactly one half for a policy equal to the reference (same
    samples); for another policy, and at each evaluation of a training run, the win rate counted by
    hand from both models' sampled completions (same seed) and the reward model's scores."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from prefrank.cli import main
    from prefrank.demo.default import build_tokenizer
    from prefrank.dpo.judge import reward_model_judge, sample_completions
    from prefrank.models import load_model
    data, model_path = default_cache
    tokenizer = build_tokenizer()
    rm = tmp_path / "rm"
    torch.manual_seed(0)
    reward_model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=0)).eval()
    reward_model.save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    reward_tokenizer = AutoTokenizer.from_pretrained(rm)
    reference = load_model(model_path, dtype=torch.float32, device=torch.device("cpu"))
    prompts = ["Q: 12+34=?\nA:", "Q: 56+78=?\nA:", "Q: 90+11=?\nA:", "Q: 23+45=?\nA:", "Q: 67+89=?\nA:"]
    judge = reward_model_judge(str(rm), reference, prompts, max_new_tokens=4)
    assert judge(reference, tokenizer) == 0.5
    policy = tiny_model("llama").eval()
    reference_texts = sample_completions(reference, tokenizer, prompts, 4, 0)
    policy_texts = sample_completions(policy, tokenizer, prompts, 4, 0)
    expected, rewards = hand_win_rate(reward_model, reward_tokenizer, prompts, policy_texts, reference_texts)
    print(f"by hand {expected} from {list(zip(policy_texts, reference_texts))}, rewards {rewards}")
    assert expected not in (0.0, 0.5, 1.0)  # a judge that swapped the sides or ignored them would show
    assert judge(policy, tokenizer) == pytest.approx(expected, abs=1e-6)  # the judge averages in float32

    out = tmp_path / "run"
    rows = [row for row in open(data) if json.loads(row)["alpha"] != 0.5][:12]  # tied rows are left out
    (tmp_path / "val.jsonl").write_text("".join(rows))
    val_prompts = [json.loads(row)["prompt"] for row in rows[:7]]  # --judge-prompts 7: the first validation rows
    assert main(["train", "--model", model_path, "--data", data, "--val-data", str(tmp_path / "val.jsonl"),
                 "--out", str(out), "--lr", "3e-2", "--max-steps", "1", "--eval-every", "1", "--eval-pairs", "8",
                 "--judge-model", str(rm), "--judge-prompts", "7", "--judge-max-new-tokens", "4"]) == 0
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    trained = load_model(str(out / "final"), dtype=torch.float32, device=torch.device("cpu"))
    expected, rewards = hand_win_rate(reward_model, reward_tokenizer, val_prompts,
                                      sample_completions(trained, tokenizer, val_prompts, 4, 0),
                                      sample_completions(reference, tokenizer, val_prompts, 4, 0))
    print(f"after one step: logged {lines[1]['judge']}, by hand {expected}, rewards {rewards}")
    assert expected != 0.5
    assert lines[0]["judge"] == 0.5 and lines[1]["judge"] == pytest.approx(expected, abs=1e-6)


@needs_shared
@pytest.mark.parametrize("mode", ["joint", "trl", "separate"])
def test_trainer_tokenizes_as_the_scorer_does(mode, hh_pairs, tmp_path):
    """The reference log-probs the trainer trains against are the ones `prefrank score` writes
    with the same tokenization mode (and differ from another mode's)."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    from prefrank.cli import main
    data = str(hh_pairs)
    out = tmp_path / "dpo"
    train(TrainOptions(model=str(STORIES), data=data, val_data=data, out=str(out), max_steps=1, eval_every=1,
                       eval_pairs=4, batch_size=2, tokenization=mode), log=lambda m: None)
    cached = load_file(out / "reference_logps.safetensors")["train"]  # the training rows, in file order
    for table_mode in ("joint", "trl", "separate"):
        table_path = tmp_path / f"{table_mode}.parquet"
        assert main(["score", "--data", data, "--model", str(STORIES), "--out", str(table_path),
                     "--tokenization", table_mode]) == 0
        table = pq.read_table(table_path).to_pydict()
        scored = torch.tensor([table["logp_chosen"], table["logp_rejected"]], dtype=torch.float64).T
        err = (scored - cached).abs().max().item()
        print(f"trained with {mode}, scored with {table_mode}: max |Δ| {err:.2e}")
        assert (err <= 1e-3) == (table_mode == mode)  # batch composition changes fp32 rounding


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_evaluation_reports_the_loss_the_run_trains_with(loss_type):
    """The logged DPO loss is the configured loss type's, written out here from the log-probs."""
    from prefrank.dpo.trainer import evaluate
    lm = CausalLM(tiny_model("llama"))
    g = torch.Generator().manual_seed(7)
    items = [Tokenized(torch.randint(0, VOCAB, (5,), generator=g).tolist(),
                       [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 4)]) for _ in range(6)]
    ref = torch.randn(6, 2, generator=g, dtype=torch.float64) - 12
    opts = TrainOptions(model="unused", data="unused", out="unused", beta=0.3, loss_type=loss_type)
    got = evaluate(lm, items, ref, opts)["dpo_loss"]
    pol = score(lm, items).logps.view(-1, 2).double()
    n = torch.tensor([[3.0, 4.0]] * 6, dtype=torch.float64)
    if loss_type == "ipo":
        z = (pol[:, 0] / n[:, 0] - pol[:, 1] / n[:, 1]) - (ref[:, 0] / n[:, 0] - ref[:, 1] / n[:, 1])
        expected = ((z - 1 / (2 * 0.3)) ** 2).mean()
    else:
        z = (pol[:, 0] - pol[:, 1]) - (ref[:, 0] - ref[:, 1])
        expected = (torch.log1p(torch.exp(-0.3 * z)) if loss_type == "sigmoid" else torch.relu(1 - 0.3 * z)).mean()
    assert got == pytest.approx(expected.item(), rel=1e-9)


def test_tied_pairs_are_left_out_of_training(tmp_path):
    from prefrank.demo.default import build_tokenizer
    from prefrank.dpo.trainer import _load_items
    rows = [{"prompt": "Q: 1+1=?\nA:", "chosen": " 2", "rejected": " 3", "alpha": a} for a in (0.9, 0.5, 0.75, 0.5)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logged = []
    items = _load_items(str(path), build_tokenizer(), TrainOptions(model="unused", data="unused", out="unused"), None, logged.append)
    assert len(items) == 2 and any("2 pairs" in m and "tied" in m for m in logged)
