"""CHES (Razin et al., ICLR 2025) and the hidden-state sums it comes from, against float64
output_hidden_states of a plain Hugging Face forward, each prompt + completion alone."""
import copy
import gzip
import json

import pyarrow.parquet as pq
import pytest
import torch

from conftest import HH, STORIES, needs_shared
from prefrank.cli import main
from prefrank.data import Columns, to_example
from prefrank.models import CausalLM
from prefrank.scoring import score
from prefrank.tokenization import tokenize_example
from test_scoring import random_items
from tiny_models import tiny_model

METHODS = ("packed", "kv", "naive")


def float64_hidden_sums(model, items):
    """Per completion (flattened): Σ of the final hidden states at the positions that predict its
    tokens (the prompt's last token to the completion's second-to-last), in float64."""
    model64 = copy.deepcopy(model).double()
    sums = []
    with torch.no_grad():
        for it in items:
            for c in it.completion_ids:
                out = model64(input_ids=torch.tensor([it.prompt_ids + c]), output_hidden_states=True)
                hidden = out.hidden_states[-1][0]
                p = len(it.prompt_ids)
                sums.append(hidden[p - 1:p - 1 + len(c)].sum(0))
    return torch.stack(sums)


def ches_by_hand(s_w, s_l, n_w, n_l):
    raw = float(s_w @ s_l - s_w @ s_w)
    normalized = float((s_w / n_w) @ (s_l / n_l) - (s_w / n_w) @ (s_w / n_w))
    return raw, normalized


def check_sums(name, got, expected):
    err = (got.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    print(f"{name}: max abs error {err:.3g} (max |Σh| {scale:.3g})")
    assert err <= 2e-6 * scale + 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox"])
@pytest.mark.parametrize("method", METHODS)
def test_hidden_sums_equal_float64(arch, method):
    model = tiny_model(arch)
    items = random_items(7, seed=4)
    expected = float64_hidden_sums(model, items)
    s = score(CausalLM(model), items, method=method, budget=64, hidden=True)  # several batches
    check_sums(f"{arch} {method}", s.hidden_sums.cpu(), expected)
    grams = s.hidden_grams(items)
    for i, it in enumerate(items):
        w, l = expected[2 * i], expected[2 * i + 1]
        assert grams[i] == pytest.approx([float(w @ w), float(w @ l), float(l @ w), float(l @ l)], rel=1e-5, abs=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_ches_adds_no_forward_pass(method):
    """The hidden sums come from the forward passes that score the log-probs: the model is called
    as often with them as without."""
    model = tiny_model("llama")
    lm, items = CausalLM(model), random_items(6, seed=5)
    calls = []
    hook = model.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        plain = score(lm, items, method=method, budget=64)
        n_plain = len(calls)
        with_hidden = score(lm, items, method=method, budget=64, hidden=True)
    finally:
        hook.remove()
    assert len(calls) - n_plain == n_plain > 0
    assert torch.equal(plain.logps, with_hidden.logps)


@needs_shared
@pytest.mark.parametrize("method", METHODS)
def test_ches_on_real_pairs_end_to_end(method, tmp_path):
    """`prefrank score --ches --hidden-sums` on real HH rows with the real stories260K as the policy and
    a random-init model of its shape as the reference: each pair's CHES and hidden sums against float64,
    each model's in its own columns."""
    from transformers import AutoModelForCausalLM

    from prefrank.models import load_tokenizer
    rows = [json.loads(line) for line in gzip.open(HH / "helpful-base" / "test.jsonl.gz", "rt")]
    rows = [r for r in rows if len(r["chosen"]) + len(r["rejected"]) < 700][:6]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    policy = AutoModelForCausalLM.from_pretrained(str(STORIES))
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(policy.config)
    reference.save_pretrained(tmp_path / "ref")
    out = tmp_path / "s.parquet"
    assert main(["score", "--data", str(data), "--model", str(STORIES), "--ref-model", str(tmp_path / "ref"),
                 "--tokenizer", str(STORIES), "--out", str(out), "--method", method, "--ches", "--hidden-sums"]) == 0
    table = pq.read_table(out).to_pylist()
    tokenizer = load_tokenizer(str(STORIES))
    items = [tokenize_example(to_example(i, r, Columns()), tokenizer) for i, r in enumerate(rows)]
    for prefix, model in (("", policy), ("ref_", reference)):
        expected = float64_hidden_sums(model, items)
        for i, (row, it) in enumerate(zip(table, items)):
            n_w, n_l = (len(c) for c in it.completion_ids)
            raw, normalized = ches_by_hand(expected[2 * i], expected[2 * i + 1], n_w, n_l)
            assert row[prefix + "ches"] == pytest.approx(raw, rel=1e-4, abs=1e-2)
            assert row[prefix + "ches_normalized"] == pytest.approx(normalized, rel=1e-4, abs=1e-4)
            sums = torch.tensor([row[prefix + "hidden_sum_chosen"], row[prefix + "hidden_sum_rejected"]])
            check_sums(f"stories260K {prefix or 'policy_'}{method} row {i}", sums, expected[2 * i:2 * i + 2])
        assert len({round(row[prefix + "ches"], 3) for row in table}) > 1


def test_kwise_gram_and_implied_pairs(tmp_path):
    """K-wise tables hold each prompt's hidden Gram matrix; `prefrank pairs` turns it into each
    implied pair's CHES."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import byte_level_bpe
    tokenizer = byte_level_bpe()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         initializer_range=0.3)).eval()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    rows = [{"instruction": "Say: Hel", "completions": [{"response": t, "overall_score": s} for t, s in
                                                         (("lo!", 3.0), ("lo world", 1.0), ("p me", 2.0))]}]
    data = tmp_path / "k.jsonl"
    data.write_text(json.dumps(rows[0]) + "\n")
    out = tmp_path / "k.parquet"
    assert main(["score", "--data", str(data), "--model", str(tmp_path / "m"), "--out", str(out), "--ches",
                 "--prompt-cols", "instruction", "--completions-col", "completions.response",
                 "--scores-col", "completions.overall_score"]) == 0
    columns = Columns(prompt=["instruction"], completions="completions.response",
                      human_scores="completions.overall_score")
    item = tokenize_example(to_example(0, rows[0], columns), tokenizer)
    expected = float64_hidden_sums(model, [item])
    gram = pq.read_table(out).to_pylist()[0]["hidden_gram"]
    assert gram == pytest.approx((expected @ expected.T).flatten().tolist(), rel=1e-5, abs=1e-3)
    assert main(["pairs", str(out), "--out", str(tmp_path / "p.parquet")]) == 0
    pairs = pq.read_table(tmp_path / "p.parquet").to_pylist()
    for pair in pairs:
        i, j = (int(k) for k in pair["id"].split(":")[1].split(">"))
        lengths = [len(item.completion_ids[k]) for k in (i, j)]
        raw, normalized = ches_by_hand(expected[i], expected[j], *lengths)
        assert pair["ches"] == pytest.approx(raw, rel=1e-4, abs=1e-2)
        assert pair["ches_normalized"] == pytest.approx(normalized, rel=1e-4, abs=1e-4)
    assert len(pairs) == 3


def test_report_shows_ches_against_displacement(tmp_path):
    import numpy as np
    import pyarrow as pa

    from prefrank.analysis import AnalysisOptions, load_pairs, summarize
    from prefrank.analysis.metrics import spearman
    from test_analysis import write_scores
    rng = np.random.default_rng(2)
    ref = rng.normal(-20, 5, (30, 2))
    pol = ref + rng.normal(-1, 2, (30, 2))
    path = write_scores(tmp_path / "s.parquet", pol, ref)
    table = pq.read_table(path)
    ches = rng.normal(0, 1, 30)
    table = table.append_column("ref_ches", pa.array(ches)).append_column("ref_ches_normalized", pa.array(ches / 3))
    pq.write_table(table, path)
    s = summarize(load_pairs(path), AnalysisOptions(n_boot=10))
    rho = s["displacement"]["spearman_ref_ches_vs_delta_chosen"]
    assert rho == pytest.approx(spearman(ches, pol[:, 0] - ref[:, 0]))
    assert main(["report", path, "--out", str(tmp_path / "rep")]) == 0
    assert "CHES under the reference" in (tmp_path / "rep" / "report.md").read_text()
