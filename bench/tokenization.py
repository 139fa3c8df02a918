"""What the tokenization mode changes on real data: the real tiny model stories260K (its
SentencePiece-style tokenizer puts a dummy-prefix "▁" before any text it tokenizes alone) on
Anthropic HH helpful-base and PandaLM (../shared).

  python -m bench.tokenization [--rows 600]

For the rows every mode can score within the model's 512 positions: per completion, |Δ log π|
between modes; per pair, |Δ margin| (margin = log π(chosen) − log π(rejected)) and the pairs whose
ranking flips; how often each mode's ids equal those of TRL 1.16's own DPOTrainer preprocessing
(when trl is installed); and each mode's tokenization speed.
"""
import argparse
import gzip
import json
import tempfile
import time

import numpy as np
import torch

from bench.common import SHARED, command, machine, write_result
from prefrank.data import Columns, to_example
from prefrank.models import CausalLM, load_model, load_tokenizer
from prefrank.scoring import score
from prefrank.tokenization import TOKENIZATION_MODES, tokenize_examples

SOURCES = {
    "hh-helpful-base": (lambda: [json.loads(line) for line in
                                 gzip.open(SHARED / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz", "rt")],
                        Columns()),
    "pandalm": (lambda: json.load(open(SHARED / "data" / "pandalm" / "testset-v1.json")),
                Columns(prompt=["instruction", "input"], chosen="response1", rejected="response2")),
}


def tokenize_all(examples, tokenizer, max_length):
    """Per mode, the token ids of the examples every mode can score, and the seconds it took (the
    scorer's path: one tokenize_examples call per chunk)."""
    items, seconds = {}, {}
    for mode in TOKENIZATION_MODES:
        start = time.perf_counter()
        tokenized, _ = tokenize_examples(examples, tokenizer, mode=mode, max_length=max_length)
        seconds[mode] = time.perf_counter() - start
        items[mode] = [tokenized.get(ex.index) for ex in examples]
    keep = [i for i in range(len(examples)) if all(items[m][i] is not None for m in TOKENIZATION_MODES)]
    return {m: [items[m][i] for i in keep] for m in TOKENIZATION_MODES}, keep, seconds


def trl_match(rows, examples, keep, items, tokenizer, model_dir):
    """Share of rows whose ids equal TRL's own preprocessing, per mode (None without trl)."""
    try:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        return None
    if examples[keep[0]].implicit:  # full transcripts: TRL extracts the prompt itself
        trl_rows = [{"chosen": rows[i]["chosen"], "rejected": rows[i]["rejected"]} for i in keep]
    else:
        trl_rows = [{"prompt": examples[i].prompt, "chosen": examples[i].completions[0],
                     "rejected": examples[i].completions[1]} for i in keep]
    with tempfile.TemporaryDirectory() as out:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        args = DPOConfig(output_dir=out, report_to=[], use_cpu=True, max_length=None, bf16=False)
        dataset = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(trl_rows),
                             processing_class=tokenizer).train_dataset
    expected = [(r["prompt_ids"], [r["chosen_ids"], r["rejected_ids"]]) for r in dataset]
    return {m: float(np.mean([(it.prompt_ids, it.completion_ids) == e for it, e in zip(items[m], expected)]))
            for m in TOKENIZATION_MODES}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=600, help="first rows of each source (default: %(default)s)")
    parser.add_argument("--out-dir")
    args = parser.parse_args(argv)
    model_dir = str(SHARED / "models" / "stories260K")
    tokenizer = load_tokenizer(model_dir)
    lm = CausalLM(load_model(model_dir, dtype=torch.float32, device=torch.device("cpu")))
    result = {"command": command("tokenization", argv), "machine": machine(), "date": time.strftime("%Y-%m-%d"),
              "model": "stories260K", "sources": {}}
    for name, (read, columns) in SOURCES.items():
        rows = read()[:args.rows]
        examples = [to_example(i, row, columns) for i, row in enumerate(rows)]
        valid = [i for i, ex in enumerate(examples) if ex.error is None]
        items, keep, seconds = tokenize_all([examples[i] for i in valid], tokenizer, lm.max_positions)
        keep = [valid[i] for i in keep]
        logps = {m: score(lm, items[m]).logps.view(-1, 2).numpy() for m in TOKENIZATION_MODES}
        margin = {m: lp[:, 0] - lp[:, 1] for m, lp in logps.items()}
        source = {"rows": len(rows), "scored": len(keep),
                  "tokenize_rows_per_s": {m: len(valid) / s for m, s in seconds.items()},
                  "boundary_moved": {m: sum(it.boundary_moved for it in items[m]) for m in TOKENIZATION_MODES},
                  "mean_tokens_per_completion": {m: float(np.mean([len(c) for it in items[m] for c in it.completion_ids]))
                                                 for m in TOKENIZATION_MODES},
                  "trl_id_match": trl_match(rows, examples, keep, items, tokenizer, model_dir)}
        for a, b in (("joint", "separate"), ("trl", "joint")):
            diff = np.abs(logps[a] - logps[b]).ravel()
            pair = np.abs(margin[a] - margin[b])
            source[f"{a}_vs_{b}"] = {
                "mean_abs_dlogp_per_completion": float(diff.mean()), "max_abs_dlogp_per_completion": float(diff.max()),
                "mean_abs_dmargin_per_pair": float(pair.mean()), "max_abs_dmargin_per_pair": float(pair.max()),
                "ranking_flips": int(((margin[a] >= 0) != (margin[b] >= 0)).sum())}
        result["sources"][name] = source
        print(f"{name}: {len(keep)} pairs; joint vs separate: mean |Δ log π| "
              f"{source['joint_vs_separate']['mean_abs_dlogp_per_completion']:.2f} nats per completion "
              f"(max {source['joint_vs_separate']['max_abs_dlogp_per_completion']:.2f}), "
              f"{source['joint_vs_separate']['ranking_flips']} rankings flip; ids equal to TRL's: "
              f"{source['trl_id_match']}")
    print(f"-> {write_result('tokenization', result, args.out_dir)}")


if __name__ == "__main__":
    main()
