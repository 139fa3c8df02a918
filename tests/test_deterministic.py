"""`--deterministic` (issue 26): the same bits for every pair whatever the token budget, chunk size, row
order, method, thread count or number of processes, on real HH rows under stories260K and on a random-init
model of each architecture family; and the same values as a float64 forward within the usual tolerance."""
import gzip
import itertools
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from conftest import HH, STORIES, free_port, interrupted_at_chunk, needs_shared
from prefrank.cli import main
from prefrank.data import Columns, read_examples
from prefrank.demo.default import build_tokenizer
from prefrank.demo.task import make_pairs
from tiny_models import ARCHS, float64_logp, tiny_model

VARIANTS = {  # what a table must not depend on
    "token budget": ["--max-tokens-per-batch", "700"],
    "chunk size": ["--chunk-rows", "7"],
    "method packed": ["--method", "packed"],
    "method naive": ["--method", "naive"],
    "method kv": ["--method", "kv"],
}


def by_id(path) -> dict:
    return {row["id"]: row for row in pq.read_table(path).to_pylist()}


def assert_bit_identical(got, expected, what):
    """Every value, floats to the last bit (== on Python floats compares the doubles exactly)."""
    got, expected = by_id(got), by_id(expected)
    assert got.keys() == expected.keys(), what
    differ = [i for i in expected if got[i] != expected[i]]
    print(f"{what}: {len(differ)} of {len(expected)} rows differ")
    assert not differ, (what, differ[:3])


@pytest.fixture(scope="module")
def hh(tmp_path_factory):
    """The first 120 HH helpful-base test pairs, and the same rows in reverse order."""
    root = tmp_path_factory.mktemp("det")
    with gzip.open(HH / "helpful-base" / "test.jsonl.gz", "rt") as f:
        rows = [dict(json.loads(line), id=f"hh{i}") for i, line in zip(range(120), f)]
    for name, ordered in (("hh.jsonl", rows), ("reversed.jsonl", rows[::-1])):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in ordered))
    return root


def args(data, out, *extra):
    return ["score", "--data", str(data), "--model", str(STORIES), "--ref-model", str(STORIES), "--out", str(out),
            "--per-token", "--ches", "--deterministic", *extra]


@needs_shared
def test_real_pairs_score_the_same_bits_under_every_variant(hh, tmp_path):
    base = tmp_path / "base.parquet"
    assert main(args(hh / "hh.jsonl", base)) == 0
    table = pq.read_table(base).to_pylist()
    assert sum(r["status"] == "ok" for r in table) > 60  # the rest are over the model's 512 positions
    for what, extra in VARIANTS.items():
        out = tmp_path / f"{what.replace(' ', '_')}.parquet"
        assert main(args(hh / "hh.jsonl", out, *extra)) == 0
        assert_bit_identical(out, base, what)
    assert main(args(hh / "reversed.jsonl", tmp_path / "reversed.parquet")) == 0
    assert_bit_identical(tmp_path / "reversed.parquet", base, "row order")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "prefrank", *args(hh / "hh.jsonl", tmp_path / "one.parquet")], env=env,
                   check=True, capture_output=True)
    assert_bit_identical(tmp_path / "one.parquet", base, "one thread")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), "-m", "prefrank"]
    subprocess.run(torchrun + args(hh / "hh.jsonl", tmp_path / "two.parquet", "--chunk-rows", "16"),
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
    assert_bit_identical(tmp_path / "two.parquet", base, "two processes")


@needs_shared
def test_deterministic_scores_equal_a_float64_forward(hh, tmp_path):
    out = tmp_path / "s.parquet"
    assert main(args(hh / "hh.jsonl", out, "--limit", "12")) == 0
    table = by_id(out)
    examples = [ex for ex in read_examples(str(hh / "hh.jsonl"), Columns(), limit=12)
                if table[ex.id]["status"] == "ok"][:4]
    worst = 0.0
    for ex in examples:
        for k, name in enumerate(("chosen", "rejected")):
            expected = float64_logp(STORIES, ex.prompt, ex.completions[k], siblings=[ex.completions[1 - k]])
            worst = max(worst, abs(table[ex.id][f"logp_{name}"] - expected))
    print(f"max |deterministic - float64| over {len(examples)} pairs: {worst:.3g}")
    assert examples and worst < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_family_is_batch_invariant(arch, tmp_path):
    folder = tmp_path / arch
    tiny_model(arch).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    rows = make_pairs(30, seed=3)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = ["score", "--data", str(data), "--model", str(folder), "--per-token", "--deterministic"]
    assert main(run + ["--out", str(tmp_path / "base.parquet")]) == 0
    for what, extra in itertools.islice(VARIANTS.items(), 4):
        out = tmp_path / f"{what.replace(' ', '_')}.parquet"
        assert main(run + ["--out", str(out), *extra, "--max-tokens-per-batch", "64"]) == 0
        assert_bit_identical(out, tmp_path / "base.parquet", f"{arch} {what}")


@pytest.mark.parametrize("extra, message", [(["--compile"], "--deterministic with --compile"),
                                            (["--tp", "2"], "--deterministic with --tp")])
def test_refused_combinations(tmp_path, capsys, extra, message):
    code = main(["score", "--deterministic", "--out", str(tmp_path / "s.parquet"), *extra])
    assert code == 2 and message in capsys.readouterr().err


def test_the_sidecar_records_the_mode_and_resume_refuses_the_other(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(12, seed=1)))
    out = tmp_path / "s.parquet"
    run = ["score", "--data", str(data), "--model", str(folder), "--out", str(out), "--chunk-rows", "4"]
    with interrupted_at_chunk(1):
        assert main(run + ["--deterministic"]) == 130
    capsys.readouterr()
    assert main(run + ["--resume"]) == 2 and "other --deterministic" in capsys.readouterr().err
    assert main(run + ["--resume", "--deterministic"]) == 0
    err = capsys.readouterr().err
    assert "resumed: 1 parts" in err and "deterministic: each row scored alone by the kv method" in err
    assert json.loads(open(f"{out}.meta.json").read())["options"]["deterministic"] is True
    out.unlink()
    assert main(run + ["--deterministic", "--method", "packed", "--max-tokens-per-batch", "700"]) == 0
    assert "(--method packed and --max-tokens-per-batch 700 not used)" in capsys.readouterr().err


def test_training_and_the_trl_reference_score_deterministically(tmp_path, monkeypatch):
    """`prefrank train`'s reference log-probs and PrefrankDPOTrainer's reference precompute in the
    deterministic mode: the bits `prefrank score --deterministic` gives the same rows, whatever the parts
    or lists the rows are scored in."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from prefrank.dpo import trainer as prefrank_trainer
    from prefrank.dpo import trl_reference
    from prefrank.dpo.trl_trainer import PrefrankDPOTrainer
    from prefrank.models import load_tokenizer
    from prefrank.runtime import Layout, load_lm
    from prefrank.tokenization import tokenize_examples
    from test_trl import config, reference_columns
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in make_pairs(20, seed=4)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    table = tmp_path / "s.parquet"
    assert main(["score", "--data", str(data), "--model", str(folder), "--out", str(table), "--tokenization", "trl",
                 "--deterministic", "--keep-column-order"]) == 0
    scored = pq.read_table(table).to_pydict()
    expected = [[a, b] for a, b in zip(scored["logp_chosen"], scored["logp_rejected"])]

    monkeypatch.setattr(trl_reference, "CHUNK_ROWS", 7)  # parts of 7 rows, not the table's one chunk
    precomputed = reference_columns(PrefrankDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder), args=config(tmp_path / "trl", precompute_ref_log_probs=True),
        train_dataset=Dataset.from_list(pairs), processing_class=build_tokenizer(), deterministic=True))
    assert precomputed.tolist() == expected

    opts = prefrank_trainer.TrainOptions(model=str(folder), data=str(data), out=str(tmp_path / "run"),
                                         tokenization="trl", deterministic=True)
    lm = load_lm(str(folder), opts, torch.device("cpu"), torch.float32, Layout(0, 1))
    items = list(tokenize_examples(list(read_examples(str(data), Columns(keep_column_order=True))), load_tokenizer(
        str(folder)), mode="trl")[0].values())
    refs = prefrank_trainer._reference_logps(lm, {"all": items, "some": items[3:11]}, tmp_path / "cache", "k", True)
    assert refs["all"].tolist() == expected and refs["some"].tolist() == expected[3:11]
