"""Grouping one vote per row into pairs (--group-by): memory growth and speed of the SQLite spill.

  python -m bench.grouping [--mb 300] [--file-type jsonl] [--smoke]

Writes a one-vote-per-row file of about --mb megabytes that mirrors the AlpacaFarm cross-annotations
(tatsu-lab/alpaca_eval alpaca_farm_human_crossannotations.json: instruction, input, output_1, output_2,
preference 1/2, annotator_index; 4 votes per pair), its rows annotator by annotator so that a pair's
votes lie a quarter of the file apart. A fresh process then groups it through prefrank's own reader
(open_examples with the alpacafarm-cross-annotations preset) and reports its RSS growth while grouping
(peak RSS above the RSS once prefrank and torch are imported, peak reset through /proc/self/clear_refs;
not ru_maxrss, which keeps the RSS of the parent that spawned the process), its peak RSS, and votes/s.
Every pair must come out once, with its 4 votes and the alpha they give.
`--file-type json` writes the same rows as one JSON array (the published file's layout), which the
reader parses whole before grouping.
"""
import argparse
import itertools
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import command, machine, peak_rss_since_reset, reset_peak_rss, write_result

VOTES_PER_PAIR = 4
WORDS = [w for w in "the a of to and in is that it for on with as was be by this are or an at from which have "
         "not has but can more will one all their would there what so about if when also other into some "
         "time could these two may than first then only its new very many most over such where after our "
         "water light people answer question example story number list write recipe reason best".split()]


def text(rng: random.Random, words: int) -> str:
    sentence = " ".join(rng.choices(WORDS, k=words))
    return sentence[0].upper() + sentence[1:] + "."


def write_votes(path: Path, megabytes: float, file_type: str, seed: int = 0) -> tuple[int, list[float]]:
    """The vote file; returns its number of pairs and each pair's expected alpha (share of votes for
    output_1). Pairs are generated until their rows reach the size, then written annotator by annotator."""
    rng = random.Random(seed)
    pairs, size = [], 0
    while size < megabytes * 1e6:
        pair = {"instruction": text(rng, rng.randint(8, 40)), "input": text(rng, 20) if rng.random() < 0.4 else "",
                "output_1": text(rng, rng.randint(20, 120)), "output_2": text(rng, rng.randint(20, 120))}
        votes = [rng.choice([1, 2]) for _ in range(VOTES_PER_PAIR)]
        pairs.append((pair, votes))
        size += VOTES_PER_PAIR * (len(json.dumps(pair)) + 40)
    with open(path, "w") as f:
        f.write("[\n" if file_type == "json" else "")
        for annotator in range(VOTES_PER_PAIR):
            for i, (pair, votes) in enumerate(pairs):
                row = json.dumps({**pair, "preference": votes[annotator], "annotator_index": annotator})
                last = annotator == VOTES_PER_PAIR - 1 and i == len(pairs) - 1
                f.write(row + ("\n" if file_type == "jsonl" else "\n]\n" if last else ",\n"))
    return len(pairs), [votes.count(1) / VOTES_PER_PAIR for _, votes in pairs]


def child(data: str, expected: str):
    from prefrank.data import open_examples, preset_columns
    alphas = json.loads(Path(expected).read_text())
    baseline = reset_peak_rss()
    start = time.perf_counter()
    cols, examples = open_examples(data, preset_columns("alpacafarm-cross-annotations"))
    pairs = 0
    for ex, alpha in itertools.zip_longest(examples, alphas):  # checked as they come: nothing kept
        assert ex is not None and alpha is not None, f"{pairs} pairs grouped, {len(alphas)} written"
        got = (ex.error, ex.n_votes, 1 - ex.alpha if ex.reoriented else ex.alpha)
        assert got == (None, VOTES_PER_PAIR, alpha), f"pair {pairs}: (error, votes, alpha for output_1) = {got}, " \
                                                     f"expected {(None, VOTES_PER_PAIR, alpha)}"
        pairs += 1
    seconds = time.perf_counter() - start
    peak = peak_rss_since_reset()
    assert cols.group_by == ["instruction", "input", "output_1", "output_2"], cols.group_by
    print(json.dumps({"pairs": pairs, "votes": pairs * VOTES_PER_PAIR, "seconds": seconds,
                      "votes_per_s": pairs * VOTES_PER_PAIR / seconds, "rss_growth_mb": (peak - baseline) / 2**20,
                      "baseline_rss_mb": baseline / 2**20, "peak_rss_mb": peak / 2**20}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=300, help="size of the vote file in MB (default: %(default)s)")
    parser.add_argument("--file-type", choices=["jsonl", "json"], default="jsonl",
                        help="JSON lines (streamed) or one JSON array (read whole); default: %(default)s")
    parser.add_argument("--smoke", action="store_true", help="a 1 MB file: checks the script runs")
    parser.add_argument("--child", nargs=2, metavar=("DATA", "EXPECTED"), help=argparse.SUPPRESS)
    parser.add_argument("--out-dir")
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child)
    megabytes = 1 if args.smoke else args.mb
    with tempfile.TemporaryDirectory() as tmp:
        data, expected = Path(tmp) / f"votes.{args.file_type}", Path(tmp) / "alphas.json"
        start = time.perf_counter()
        n_pairs, alphas = write_votes(data, megabytes, args.file_type)
        expected.write_text(json.dumps(alphas))
        print(f"wrote {data.stat().st_size / 1e6:.1f} MB, {n_pairs} pairs × {VOTES_PER_PAIR} votes "
              f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        run = subprocess.run([sys.executable, "-m", "bench.grouping", "--child", str(data), str(expected)],
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if run.returncode:
            raise SystemExit(run.stderr)
        measured = json.loads(run.stdout.strip().splitlines()[-1])
        result = {"benchmark": "grouping votes into pairs", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                  "command": command("grouping", argv), "file_type": args.file_type,
                  "file_mb": data.stat().st_size / 1e6, **measured}
    print(json.dumps(result, indent=2))
    if not args.smoke:
        write_result(f"grouping_{args.file_type}", result, args.out_dir)
    return result


if __name__ == "__main__":
    main()
