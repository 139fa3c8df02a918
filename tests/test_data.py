"""Reading and normalizing preference rows: every format, every bad row kept as an error."""
import gzip
import json
import os
import re

import pytest

from conftest import HH, PANDALM, needs_shared
from prefrank.data import Columns, read_examples, read_rows, split_implicit_prompt, to_example
from prefrank.errors import InputError
from prefrank.votes import HELP as VOTE_CODING_HELP

PAIR = {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."}


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


def test_explicit_pair():
    ex = to_example(0, PAIR, Columns())
    assert (ex.prompt, ex.completions, ex.error, ex.id) == ("Say hi.", [" Hi!", " No."], None, "0")


def test_implicit_hh_prompt_cut_at_last_assistant():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant: An apple."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant: A car."
    ex = to_example(3, {"chosen": chosen, "rejected": rejected, "id": 17}, Columns())
    assert ex.prompt == "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant:"
    assert ex.completions == [" An apple.", " A car."]
    assert ex.prompt + ex.completions[0] == chosen and ex.prompt + ex.completions[1] == rejected
    assert ex.id == "17"


def test_implicit_without_assistant_cuts_at_whitespace():
    assert split_implicit_prompt("I like cats", "I like cars") == ("I like", [" cats", " cars"])
    assert split_implicit_prompt("cats", "dogs") == ("", ["cats", "dogs"])
    assert split_implicit_prompt("I like cats", "I like cars", "I like dogs") == ("I like", [" cats", " cars", " dogs"])


@needs_shared
def test_implicit_on_real_hh_rows():
    rows = [json.loads(line) for line in gzip.open(HH / "helpful-base" / "test.jsonl.gz", "rt")]
    for i, row in enumerate(rows[:300]):
        ex = to_example(i, row, Columns())
        if ex.error:
            common = os.path.commonprefix([row["chosen"], row["rejected"]])
            cut = common.rfind("\n\nAssistant:") + len("\n\nAssistant:")
            blank = not row["chosen"][cut:].strip() or not row["rejected"][cut:].strip()
            assert ex.error == ("empty or whitespace-only completion" if blank else "chosen and rejected are identical")
            continue
        assert ex.prompt.endswith("\n\nAssistant:")
        assert ex.prompt + ex.completions[0] == row["chosen"] and ex.prompt + ex.completions[1] == row["rejected"]


def test_conversational_explicit_and_implicit():
    prompt = [{"role": "user", "content": "Hi"}]
    chosen = [{"role": "assistant", "content": "Hello"}]
    rejected = [{"role": "assistant", "content": "Go away"}]
    ex = to_example(0, {"prompt": prompt, "chosen": chosen, "rejected": rejected}, Columns())
    assert ex.error is None and ex.prompt == prompt and ex.completions == [chosen, rejected]
    ex = to_example(0, {"chosen": prompt + chosen, "rejected": prompt + rejected}, Columns())
    assert ex.error is None and ex.prompt == prompt and ex.completions == [chosen, rejected]
    bad = to_example(0, {"prompt": prompt, "chosen": [{"role": "assistant"}], "rejected": rejected}, Columns())
    assert "role' and 'content'" in bad.error


def test_column_mapping_and_pandalm_votes():
    row = {"instruction": "Fix this.", "input": "teh cat", "response1": "the cat", "response2": "teh cat",
           "annotator1": 1, "annotator2": 0, "annotator3": 1, "idx": 5}
    cols = Columns(prompt=["instruction", "input"], chosen="response1", rejected="response2", id="idx",
                   votes=["annotator1", "annotator2", "annotator3"])
    ex = to_example(0, row, cols)
    assert ex.prompt == "Fix this.\n\nteh cat" and ex.completions == ["the cat", "teh cat"]
    assert ex.alpha == pytest.approx((2 + 0.5) / 3) and ex.id == "5" and ex.n_votes == 3 and not ex.reoriented
    ex = to_example(0, {**row, "input": ""}, cols)
    assert ex.prompt == "Fix this."
    assert "7 is not a vote in the 1/2 coding" in to_example(0, {**row, "annotator2": 7}, cols).error


def test_alpha_and_votes_columns():
    assert to_example(0, {**PAIR, "alpha": 0.75}, Columns()).alpha == 0.75
    assert to_example(0, {**PAIR, "votes": [1, 1, 0.5, 0]}, Columns()).alpha == pytest.approx(2.5 / 4)
    assert "'alpha' must be" in to_example(0, {**PAIR, "alpha": 1.5}, Columns()).error
    assert "'votes' must be" in to_example(0, {**PAIR, "votes": []}, Columns()).error
    assert to_example(0, PAIR, Columns()).alpha is None


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string"),
    ({"prompt": ["x"], "chosen": "a", "rejected": "b"}, "field 'prompt' must be a string"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "empty or whitespace-only completion"),
    ({"prompt": "p", "chosen": "a", "rejected": " \n\t "}, "empty or whitespace-only completion"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "  "}],
      "rejected": [{"role": "assistant", "content": "yo"}]}, "empty or whitespace-only completion"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
    ({"chosen": "same text", "rejected": "same text"}, "identical"),
    ([1, 2], "not an object"),
])
def test_bad_rows_become_errors(row, message):
    ex = to_example(4, row, Columns())
    assert ex.error is not None and message in ex.error, ex.error
    assert ex.index == 4


def test_completions_include_prompt():
    cols = Columns(completions_include_prompt=True)
    ex = to_example(0, {"prompt": "Q:", "chosen": "Q: yes", "rejected": "Q: no"}, cols)
    assert ex.completions == [" yes", " no"]
    assert "not a prefix" in to_example(0, {"prompt": "Q:", "chosen": "Q: yes", "rejected": "no"}, cols).error


def test_jsonl_keeps_malformed_lines_in_place(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR], raw_lines=['{"prompt": broken', "", json.dumps(PAIR), "[1]"])
    examples = list(read_examples(path, Columns()))
    assert [e.index for e in examples] == [0, 1, 2, 3]
    assert examples[0].error is None and examples[2].error is None
    assert "line 2: invalid JSON" in examples[1].error
    assert "not an object" in examples[3].error


def test_file_formats_give_the_same_examples(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [dict(PAIR, id=f"r{i}", rejected=f" No {i}.") for i in range(5)]
    paths = [write_jsonl(tmp_path / "d.jsonl", rows)]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    paths.append(str(tmp_path / "d.jsonl.gz"))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    paths.append(str(tmp_path / "d.json"))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    paths.append(str(tmp_path / "d.parquet"))
    expected = [(f"r{i}", "Say hi.", [" Hi!", f" No {i}."]) for i in range(5)]
    for path in paths:
        assert [(e.id, e.prompt, e.completions) for e in read_examples(path, Columns())] == expected, path
    assert len(list(read_examples(paths[0], Columns(), limit=2))) == 2


def test_hf_dataset_from_local_folders(tmp_path):
    import datasets
    rows = [dict(PAIR, rejected=f" No {i}.") for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "train.jsonl", rows)
    for source in (tmp_path / "saved", tmp_path / "files"):
        got = [e.completions[1] for e in read_examples(str(source), Columns(), split="train")]
        assert got == [f" No {i}." for i in range(4)], source


def test_bad_sources_are_input_errors(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network waits in tests
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="not found"):
        list(read_rows(str(tmp_path / "missing.jsonl")))
    (tmp_path / "x.xlsx").write_text("a,b\n")
    with pytest.raises(InputError, match="unknown file type"):
        list(read_rows(str(tmp_path / "x.xlsx")))
    with pytest.raises(InputError, match="cannot load dataset"):
        list(read_rows("no-such-org/no-such-dataset-prefrank"))


@needs_shared
def test_pandalm_all_rows_normalize():
    rows = json.load(open(PANDALM))
    cols = Columns(prompt=["instruction", "input"], chosen="response1", rejected="response2", id="idx",
                   votes=["annotator1", "annotator2", "annotator3"])
    examples = [to_example(i, r, cols) for i, r in enumerate(rows)]
    assert len(examples) == 999
    for ex, row in zip(examples, rows):
        votes = [row[f"annotator{j}"] for j in (1, 2, 3)]
        if ex.error is None:
            share1 = (votes.count(1) + 0.5 * votes.count(0)) / 3  # the raters' share for response1
            majority = [row["response1"], row["response2"]] if share1 >= 0.5 else [row["response2"], row["response1"]]
            assert ex.alpha == pytest.approx(max(share1, 1 - share1)) and ex.reoriented == (share1 < 0.5)
            assert ex.completions == majority and ex.n_votes == 3
        else:
            responses = (row["response1"], row["response2"])
            assert ((ex.error == "chosen and rejected are identical" and responses[0] == responses[1])
                    or (ex.error == "empty or whitespace-only completion"
                        and any(isinstance(r, str) and not r.strip() for r in responses))
                    or ("must be a string" in ex.error and not all(isinstance(r, str) for r in responses))), ex.error


# ---------------------------------------------------------------- K completions per prompt

KWISE = Columns(prompt=["instruction"], completions="completions.response", human_scores="completions.overall_score")


def ultrafeedback_row(**changes):
    row = {"instruction": "Name a colour.", "completions": [
        {"response": " Red.", "overall_score": 8.5}, {"response": " Blue.", "overall_score": 6},
        {"response": " A car.", "overall_score": 2}, {"response": " Green.", "overall_score": 8.5}]}
    row.update(changes)
    return row


def test_kwise_nested_columns():
    ex = to_example(0, ultrafeedback_row(), KWISE)
    assert ex.error is None and ex.prompt == "Name a colour."
    assert ex.completions == [" Red.", " Blue.", " A car.", " Green."] and ex.human_scores == [8.5, 6.0, 2.0, 8.5]
    assert ex.alpha is None


def test_kwise_flat_and_implicit_and_chat():
    cols = Columns(completions="completions")
    ex = to_example(0, {"completions": ["Q: hi A: yo", "Q: hi A: hey", "Q: hi A: no"], "scores": [1, 2, 0]}, cols)
    assert (ex.prompt, ex.completions) == ("Q: hi A:", [" yo", " hey", " no"])
    user = {"role": "user", "content": "hi"}
    chats = [[user, {"role": "assistant", "content": t}] for t in ("a", "b", "c")]
    ex = to_example(0, {"completions": chats, "scores": [3, 2, 1]}, cols)
    assert ex.prompt == [user] and ex.completions == [c[1:] for c in chats]


@pytest.mark.parametrize("change, message", [
    ({"completions": [{"response": " Red.", "overall_score": 1}]}, "at least 2 completions"),
    ({"completions": [{"response": " Red.", "overall_score": 1}, {"response": " Red.", "overall_score": 2}]},
     "completions 0 and 1 are identical"),
    ({"completions": [{"response": " Red.", "overall_score": 1}, {"response": " Blue."}]}, "missing field 'overall_score'"),
    ({"completions": [{"response": " Red.", "overall_score": 1}, {"response": " Blue.", "overall_score": "x"}]},
     "finite numbers"),
    ({"completions": [{"response": " Red.", "overall_score": 1}, {"response": 3, "overall_score": 2}]}, "must be a string"),
    ({"completions": "Red"}, "list of objects"),
])
def test_kwise_bad_rows(change, message):
    ex = to_example(0, ultrafeedback_row(**change), KWISE)
    assert ex.error is not None and message in ex.error, ex.error


# ---------------------------------------------------------------- the raters' verdict

TWO = {"prompt": "Q:", "first": " a", "second": " b"}
TWO_COLS = dict(chosen="first", rejected="second")


@pytest.mark.parametrize("coding, votes, share_first", [
    ("1/2", [1], 1.0), ("1/2", [2], 0.0), ("1/2", [0], 0.5), ("1/2", [1, 2, 2], 1 / 3), ("1/2", ["2", "1.0"], 0.5),
    ("0/1", [0], 1.0), ("0/1", [1], 0.0), ("0/1", [True], 0.0), ("0/1", ["false"], 1.0),
    ("1/0", [1], 1.0), ("1/0", [0], 0.0), ("1/0", [False], 0.0), ("1/0", ["TRUE"], 1.0), ("1/0", [1.0], 1.0),
    ("names", ["model_a"], 1.0), ("names", ["model_b"], 0.0), ("names", ["tie"], 0.5),
    ("names", ["tie (bothbad)", "model_a", "model_a"], (0.5 + 2) / 3),
    ("0=first,1=second,2=tie", [0], 1.0), ("0=first,1=second,2=tie", [1], 0.0), ("0=first,1=second,2=tie", [2], 0.5),
    ("0=first,1=second,2=tie", ["2", 1.0, 0], 0.5), ("0=first,1=second,2=tie", [1, 1, 0], 1 / 3),
    ("A=first, B=second, same=TIE", ["A", " same "], 0.75), ("A=first,B=second", ["B"], 0.0),
    ("true=first,false=second", [True, "false"], 0.5),
])
def test_vote_codings_and_orientation(coding, votes, share_first):
    """alpha is the raters' share for the chosen completion, and chosen is the raters' side."""
    cols = Columns(**TWO_COLS, votes=[f"v{i}" for i in range(len(votes))], vote_coding=coding)
    row = {**TWO, **{f"v{i}": v for i, v in enumerate(votes)}}
    ex = to_example(0, row, cols)
    assert ex.error is None and ex.n_votes == len(votes)
    assert ex.alpha == pytest.approx(max(share_first, 1 - share_first))
    assert ex.completions == ([" a", " b"] if share_first >= 0.5 else [" b", " a"])
    assert ex.reoriented == (share_first < 0.5)
    kept = to_example(0, row, Columns(**TWO_COLS, votes=cols.votes, vote_coding=coding, keep_column_order=True))
    assert (kept.completions, kept.alpha, kept.reoriented) == ([" a", " b"], pytest.approx(share_first), False)


@pytest.mark.parametrize("coding, values, p_first", [
    ("prob", [0.7], 0.7), ("prob", [0.2], 0.2), ("prob", ["0.25"], 0.25), ("prob", [1], 1.0), ("prob", [0], 0.0),
    ("prob", [0.5], 0.5), ("prob", [0.9, 0.3], (0.9 + 0.3) / 2), ("prob", [0.1, 0.3], (0.1 + 0.3) / 2),
    ("alpaca-eval", [1.000039552], 2 - 1.000039552), ("alpaca-eval", [1.9999930129], 2 - 1.9999930129),
    ("alpaca-eval", [1.5], 0.5), ("alpaca-eval", [0], 0.5), ("alpaca-eval", [1.0], 1.0), ("alpaca-eval", [2], 0.0),
    ("alpaca-eval", ["1.25"], 0.75),
])
def test_probability_codings_give_alpha_as_the_probability(coding, values, p_first):
    """A model's soft preference is alpha itself (no votes counted: n_votes null); chosen is the
    side it prefers, alpha then the probability of that side, computed here from the raw values
    (1 - p; AlpacaEval: preference - 1)."""
    cols = Columns(**TWO_COLS, votes=[f"v{i}" for i in range(len(values))], vote_coding=coding)
    row = {**TWO, **{f"v{i}": v for i, v in enumerate(values)}}
    ex = to_example(0, row, cols)
    assert ex.error is None and ex.n_votes is None
    if p_first >= 0.5:
        assert (ex.completions, ex.alpha, ex.reoriented) == ([" a", " b"], pytest.approx(p_first, abs=1e-15), False)
    else:
        flipped = [1 - float(v) if coding == "prob" else float(v) - 1 for v in values]  # P(second better)
        assert (ex.completions, ex.alpha, ex.reoriented) == ([" b", " a"], sum(flipped) / len(flipped), True)
    assert ex.tie == (p_first == 0.5)
    kept = to_example(0, row, Columns(**TWO_COLS, votes=cols.votes, vote_coding=coding, keep_column_order=True))
    assert (kept.completions, kept.alpha, kept.n_votes) == ([" a", " b"], pytest.approx(p_first, abs=1e-15), None)


@pytest.mark.parametrize("vote", [3, 1.5, "one", True, [0]])
def test_values_outside_an_explicit_map_are_row_errors(vote):
    coding = "0=first,1=second,2=tie"
    ex = to_example(0, {**TWO, "v": vote}, Columns(**TWO_COLS, votes=["v"], vote_coding=coding))
    assert ex.error == f"'v': {vote!r} is not a vote in the {coding} coding (the values of the map)"


@pytest.mark.parametrize("coding, why", [
    ("0=first,1=secnd", "'1=secnd' is not VALUE=first, VALUE=second or VALUE=tie"),
    ("0=first,2=tie", "a map needs a value for first and one for second"),
    ("0=first,1=second,0.0=tie", "'0.0' is mapped twice"), ("=first,1=second", "'=first' is not VALUE=first"),
    ("majority", "expected one of 1/2, 0/1, 1/0, names, prob, alpaca-eval, or a map such as 0=first,1=second,2=tie"),
])
def test_a_malformed_vote_coding_is_refused(coding, why):
    with pytest.raises(InputError, match=re.escape(why)):
        Columns(**TWO_COLS, votes=["v"], vote_coding=coding)


@pytest.mark.parametrize("coding, vote", [("1/2", 3), ("1/2", True), ("1/2", 1.5), ("1/2", "one"), ("0/1", 2),
                                          ("1/0", "yes"), ("names", "model_c"), ("names", 1), ("1/2", None),
                                          ("prob", 1.5), ("prob", -0.1), ("prob", float("nan")), ("prob", float("inf")),
                                          ("prob", True), ("prob", "likely"), ("prob", None), ("alpaca-eval", 0.5),
                                          ("alpaca-eval", 2.0001), ("alpaca-eval", -1), ("alpaca-eval", float("nan")),
                                          ("alpaca-eval", float("-inf")), ("alpaca-eval", "nan"), ("alpaca-eval", None)])
def test_bad_votes_are_row_errors(coding, vote):
    ex = to_example(0, {**TWO, "v": vote}, Columns(**TWO_COLS, votes=["v"], vote_coding=coding))
    if vote is None:  # present but null, as for any named field
        assert ex.error == "field 'v' is null"
    else:
        assert ex.error == f"'v': {vote!r} is not a vote in the {coding} coding ({VOTE_CODING_HELP[coding]})"


def test_alpha_and_votes_list_are_oriented_too():
    ex = to_example(0, {**PAIR, "alpha": 0.25}, Columns())
    assert (ex.completions, ex.alpha, ex.reoriented, ex.n_votes) == ([" No.", " Hi!"], 0.75, True, None)
    ex = to_example(0, {**PAIR, "votes": [0, 0, 0.5]}, Columns())
    assert (ex.completions, ex.alpha, ex.reoriented, ex.n_votes) == ([" No.", " Hi!"], 2.5 / 3, True, 3)
    ex = to_example(0, {**PAIR, "votes": [0, 1]}, Columns())  # an exact tie: kept as given
    assert (ex.completions, ex.alpha, ex.reoriented) == ([" Hi!", " No."], 0.5, False)
    kept = to_example(0, {**PAIR, "alpha": 0.25}, Columns(keep_column_order=True))
    assert (kept.completions, kept.alpha, kept.reoriented) == ([" Hi!", " No."], 0.25, False)


def test_csv_and_tsv_read_like_jsonl(tmp_path):
    """Cells are text: vote cells read as the numbers they spell, an alpha cell as a decimal, an
    empty alpha cell as none; quoted fields keep commas and newlines; a record with the wrong
    number of fields or a broken quote is an error row in its place."""
    import csv
    rows = [{"id": "a", "prompt": "Say, hi.", "chosen": " Hi,\nfriend!", "rejected": ' "No."', "alpha": "0.25"},
            {"id": "b", "prompt": "Count.", "chosen": " 1 2", "rejected": " 3", "alpha": ""},
            {"id": "c", "prompt": "Tab\there", "chosen": " x", "rejected": " y", "alpha": "1"}]
    for name, delimiter in (("d.csv", ","), ("d.tsv", "\t")):
        with open(tmp_path / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
        got = list(read_examples(str(tmp_path / name), Columns()))
        assert [(e.id, e.prompt, e.completions, e.alpha, e.reoriented) for e in got] == [
            ("a", "Say, hi.", [' "No."', " Hi,\nfriend!"], 0.75, True), ("b", "Count.", [" 1 2", " 3"], None, False),
            ("c", "Tab\there", [" x", " y"], 1.0, False)], name
    (tmp_path / "v.csv").write_text('prompt,first,second,label\nQ,a,b,2\nQ,a,b\nQ,"a"x,b,1\nQ,c,d,1.0\n')
    got = list(read_examples(str(tmp_path / "v.csv"), Columns(**TWO_COLS, votes=["label"])))
    assert [e.index for e in got] == [0, 1, 2, 3]
    assert (got[0].completions, got[0].alpha) == (["b", "a"], 1.0) and got[3].error is None
    assert got[1].error == "line 3: 3 fields where the header has 4"
    assert got[2].error.startswith("line 4: invalid CSV")
    (tmp_path / "dup.csv").write_text("prompt,chosen,chosen\np,a,b\n")
    with pytest.raises(InputError, match="names a column twice"):
        read_examples(str(tmp_path / "dup.csv"), Columns())


@pytest.mark.parametrize("layout", ["columns", "index", "records", "one-object", "one-object-indented", "lines"])
def test_a_json_file_is_read_in_any_layout_it_is_written_in(layout, tmp_path):
    """A .json file is an array, JSON lines, one object (one row, over one line or several), or a
    table as pandas' to_json writes it (its default "columns" layout, "index", "records"); written
    here by pandas and json themselves, read back as the rows they hold."""
    pd = pytest.importorskip("pandas")
    rows = [{"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."},
            {"prompt": "Q?", "chosen": " yes", "rejected": " no"}]
    path = tmp_path / "d.json"
    if layout in ("columns", "index", "records"):
        pd.DataFrame(rows).to_json(path, orient=layout)
    elif layout == "lines":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        rows = rows[:1]
        path.write_text(json.dumps(rows[0], indent=2 if layout.endswith("indented") else None))
    assert list(read_rows(str(path))) == rows
