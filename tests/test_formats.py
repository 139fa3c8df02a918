"""Published datasets as they are published: each preset on rows that mirror its real schema
(column names, types, codings; nothing downloaded), compared with a conversion written here;
votes grouped into pairs; the raters' orientation end to end."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import STORIES, needs_shared
from prefrank.cli import main
from prefrank.data import Columns, open_examples, preset_columns, read_examples
from prefrank.errors import InputError
from prefrank.formats import PRESETS, detect


def read_sidecar(table) -> dict:
    """The sidecar's JSON as the file holds it (OUT.meta.json beside the table)."""
    return json.loads(open(f"{table}.meta.json").read())


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def msg(role, content):
    return {"content": content, "role": role}  # the order of the published features


def oriented(prompt, first, second, shares):
    """The raters' pair, computed here: (prompt, [chosen, rejected], alpha, n_votes)."""
    share = sum(shares) / len(shares)
    if share < 0.5:
        return prompt, [second, first], sum(1 - s for s in shares) / len(shares), len(shares)
    return prompt, [first, second], share, len(shares)


# ---------------------------------------------------------------- mirror rows, one dataset each

SHP = [  # stanfordnlp/SHP: labels 1 if A is preferred, else 0
    {"post_id": "himc90", "domain": "askculinary_train", "upvote_ratio": 0.99, "history": "How long to rest a steak?",
     "c_root_id_A": "g6aoh2x", "c_root_id_B": "g6ajepl", "created_at_utc_A": 1600989153, "created_at_utc_B": 1600983436,
     "score_A": 18, "score_B": 5, "human_ref_A": "About five minutes.", "human_ref_B": "Never rest it.",
     "labels": 1, "seconds_difference": 5717.0, "score_ratio": 3.6},
    {"post_id": "himc90", "domain": "askculinary_train", "upvote_ratio": 0.99, "history": "How long to rest a steak?",
     "c_root_id_A": "g6b1xyz", "c_root_id_B": "g6aoh2x", "created_at_utc_A": 1600990000, "created_at_utc_B": 1600989153,
     "score_A": 2, "score_B": 18, "human_ref_A": "An hour or so.", "human_ref_B": "About five minutes.",
     "labels": 0, "seconds_difference": 847.0, "score_ratio": 9.0},
]
SHP_EXPECTED = [oriented(r["history"], r["human_ref_A"], r["human_ref_B"], [float(r["labels"] == 1)]) for r in SHP]

LLMBAR = [  # princeton-nlp/LLMBar: label 1 = output_1, 2 = output_2
    {"input": "Name a prime.", "output_1": "Seven.", "output_2": "Eight.", "label": 1},
    {"input": "Name a colour.", "output_1": "Loud.", "output_2": "Blue.", "label": 2},
]
LLMBAR_EXPECTED = [oriented(r["input"], r["output_1"], r["output_2"], [float(r["label"] == 1)]) for r in LLMBAR]

AUTOJ = [  # GAIR-NLP/auto-j data/test/testdata_pairwise.jsonl: label 0 = response 1, 1 = response 2, 2 = tie
    {"scenario": "writing_cooking_recipe", "label": 0, "prompt": "Give me a soup recipe.",
     "response 1": "Boil leeks and potatoes, then blend.", "response 2": "Soup is wet."},
    {"scenario": "default", "label": 1, "prompt": "What is 2 + 2?", "response 1": "5.", "response 2": "4."},
    {"scenario": "chitchat", "label": 2, "prompt": "Hi!", "response 1": "Hello!", "response 2": "Hi there!"},
]
AUTOJ_EXPECTED = [oriented(r["prompt"], r["response 1"], r["response 2"], [{0: 1.0, 1: 0.0, 2: 0.5}[r["label"]]])
                  for r in AUTOJ]

PKU = [  # PKU-Alignment/PKU-SafeRLHF: better_response_id / safer_response_id 0 = response_0, 1 = response_1
    {"prompt": "How do I pick a lock?", "response_0": "Use a tension wrench and a pick.", "response_1": "I can't help.",
     "prompt_source": "Alpaca3-70B", "response_0_source": "Alpaca-7B", "response_1_source": "Alpaca2-7B",
     "is_response_0_safe": False, "is_response_1_safe": True, "response_0_severity_level": 1,
     "response_1_severity_level": 0, "better_response_id": 0, "safer_response_id": 1},
    {"prompt": "Tell me a joke.", "response_0": "No.", "response_1": "Why did the chicken cross the road?",
     "prompt_source": "Alpaca3-70B", "response_0_source": "Alpaca-7B", "response_1_source": "Alpaca2-7B",
     "is_response_0_safe": True, "is_response_1_safe": True, "response_0_severity_level": 0,
     "response_1_severity_level": 0, "better_response_id": 1, "safer_response_id": 1},
]
PKU_EXPECTED = {key: [oriented(r["prompt"], r["response_0"], r["response_1"], [float(r[key] == 0)]) for r in PKU]
                for key in ("better_response_id", "safer_response_id")}

ALPACA_PREFERENCE = [  # tatsu-lab/alpaca_farm alpaca_human_preference: preference 1 = output_1, 2 = output_2
    {"instruction": "Translate to French.", "input": "cat", "output_1": "chat", "output_2": "chien", "preference": 1},
    {"instruction": "Give a synonym.", "input": "", "output_1": "big", "output_2": "large", "preference": 2},
]
ALPACA_PREFERENCE_EXPECTED = [oriented(r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""), r["output_1"],
                                       r["output_2"], [float(r["preference"] == 1)]) for r in ALPACA_PREFERENCE]


def alpaca_votes(pairs, extra):
    """One row per vote (alpaca_eval's human (cross-)annotations), the votes of one pair spread over
    non-adjacent rows: pairs = [(instruction, input, output_1, output_2, [preferences])]."""
    rows = []
    for round_ in range(max(len(p[4]) for p in pairs)):
        for i, (instruction, input_, out1, out2, prefs) in enumerate(pairs):
            if round_ < len(prefs):
                rows.append({"instruction": instruction, "input": input_, "output_1": out1, "output_2": out2,
                             "preference": prefs[round_], **extra(round_, i)})
    return rows


ALPACA_PAIRS = [("Name a fruit.", "", "Apple.", "Chair.", [1, 1, 2, 1]),  # 3 of 4 for output_1
                ("Add 2 and 2.", "", "5", "4", [2, 2, 1, 2]),  # 3 of 4 for output_2: reoriented
                ("Say hi.", "", "Hi!", "Hello!", [1, 2, 2, 1]),  # an exact tie
                ("Spell cat.", "", "c-a-t", "k-a-t", [1])]  # judged once
ALPACA_EXPECTED = [oriented(p[0], p[2], p[3], [float(v == 1) for v in p[4]]) for p in ALPACA_PAIRS]
ALPACA_CROSS = alpaca_votes(ALPACA_PAIRS, lambda round_, i: {"annotator_index": round_})
ALPACA_ANNOTATIONS = alpaca_votes(ALPACA_PAIRS, lambda round_, i: {"annotator": 10 * round_ + i})



def alpaca_eval_rows(annotator, reference, model, judged):
    """AlpacaEval's results/MODEL/ANNOTATOR/annotations.json, a row per instruction in its keys
    and their order (pandas' records: floats as written, NaN as null); the 1/2 annotators'
    rows have no raw_completion. judged = [(instruction, output_1, output_2, preference)]."""
    rows = []
    for instruction, out1, out2, preference in judged:
        row = {"dataset": "helpful_base", "instruction": instruction, "output_1": out1, "generator_1": reference,
               "output_2": out2, "generator_2": model, "annotator": annotator, "preference": preference,
               "time_per_example": 0.3821284187, "price_per_example": 0.00978}
        if annotator.startswith("weighted_"):
            row["raw_completion"] = {"concise_explanation": "", "ordered_models": [{"model": "m", "rank": 1}]}
        rows.append(row)
    return rows


ALPACA_EVAL_WEIGHTED = alpaca_eval_rows("weighted_alpaca_eval_gpt4_turbo", "gpt4_1106_preview", "tiny_model", [
    ("Name a fruit.", "Apple.", "Chair.", 1.000039552),  # output_1 better
    ("Add 2 and 2.", "5", "4", 1.9999930129),  # output_2 better: reoriented, alpha = preference - 1
    ("Say hi.", "Hi!", "Hello!", 1.5),  # a draw
    ("Spell cat.", "c-a-t", "k-a-t", 1.2345678901),
    ("Name a colour.", "Loud.", "Blue.", 1.7310585786),  # reoriented
    ("Count to two.", "1 2", "2 1", 0),  # the legacy draw
])
ALPACA_EVAL_HARD = alpaca_eval_rows("alpaca_eval_gpt4", "text_davinci_003", "tiny_model", [
    ("Name a fruit.", "Apple.", "Chair.", 1.0), ("Add 2 and 2.", "5", "4", 2.0), ("Say hi.", "Hi!", "Hello!", 2.0),
    ("Spell cat.", "c-a-t", "k-a-t", 1.0)])


def alpaca_eval_expected(rows):
    """(prompt, [chosen, rejected], alpha, n_votes None) from the raw preference, computed here:
    alpha = 2 - preference, or preference - 1 with the candidates swapped where output_2 is
    preferred (preference > 1.5); 1.5 and 0 are draws."""
    out = []
    for r in rows:
        p = r["preference"]
        if p > 1.5:
            out.append((r["instruction"], [r["output_2"], r["output_1"]], p - 1, None))
        else:
            out.append((r["instruction"], [r["output_1"], r["output_2"]], 0.5 if p == 0 else 2 - p, None))
    return out


Q1, Q2 = "Write a haiku about rain.", "Now make it rhyme."


def mt_row(qid, model_a, model_b, winner, judge, turn, answers_a, answers_b):
    conv = lambda answers: [m for q, a in zip((Q1, Q2), answers) for m in (msg("user", q), msg("assistant", a))]  # noqa: E731
    return {"question_id": qid, "model_a": model_a, "model_b": model_b, "winner": winner, "judge": judge,
            "conversation_a": conv(answers_a), "conversation_b": conv(answers_b), "turn": turn}


GPT4, CLAUDE = ("Rain taps the roof.", "Rain again, in vain."), ("Grey sky weeps.", "Sky so grey, rain all day.")
MT_BENCH = [  # lmsys/mt_bench_human_judgments (human): one vote per row, both orders of a model pair
    mt_row(81, "gpt-4", "claude-v1", "model_a", "expert_0", 1, GPT4, CLAUDE),
    mt_row(81, "gpt-4", "claude-v1", "model_b", "expert_0", 2, GPT4, CLAUDE),
    mt_row(81, "claude-v1", "gpt-4", "model_b", "expert_1", 1, CLAUDE, GPT4),  # gpt-4 again, shown second
    mt_row(81, "claude-v1", "gpt-4", "tie", "author_2", 2, CLAUDE, GPT4),
    mt_row(81, "gpt-4", "claude-v1", "model_a", "author_3", 1, GPT4, CLAUDE),
]
MT_EXPECTED = [  # turn 1: the first answers only; turn 2: the rest of each conversation after the shared question
    oriented([msg("user", Q1)], [msg("assistant", GPT4[0])], [msg("assistant", CLAUDE[0])], [1.0, 1.0, 1.0]),
    oriented([msg("user", Q1)], [msg("assistant", GPT4[0]), msg("user", Q2), msg("assistant", GPT4[1])],
             [msg("assistant", CLAUDE[0]), msg("user", Q2), msg("assistant", CLAUDE[1])], [0.0, 0.5]),
]

ARENA = [  # lmsys/chatbot_arena_conversations: one battle per row, each with its own conversation
    {"question_id": "58210e39b3fd4441a2bd4a518bb44c2d", "model_a": "chatglm-6b", "model_b": "koala-13b",
     "winner": "model_b", "judge": "arena_user_973",
     "conversation_a": [msg("user", "What is 2+2?"), msg("assistant", "5")],
     "conversation_b": [msg("user", "What is 2+2?"), msg("assistant", "4")], "turn": 1, "anony": True,
     "language": "English", "tstamp": 1682351591.1322,
     "openai_moderation": {"categories": {"harassment": False}, "category_scores": {"harassment": 1e-05},
                           "flagged": False},
     "toxic_chat_tag": {"roberta-large": {"flagged": False, "probability": 0.008}}},
    {"question_id": "2564acd09e3942fd97657d05282d4389", "model_a": "oasst-pythia-12b", "model_b": "alpaca-13b",
     "winner": "tie (bothbad)", "judge": "arena_user_973",
     "conversation_a": [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Bye"), msg("assistant", "Ciao")],
     "conversation_b": [msg("user", "Hi"), msg("assistant", "Hey."), msg("user", "Bye"), msg("assistant", "Later")],
     "turn": 2, "anony": True, "language": "English", "tstamp": 1682351593.0,
     "openai_moderation": {"categories": {"harassment": False}, "category_scores": {"harassment": 2e-05},
                           "flagged": False},
     "toxic_chat_tag": {"roberta-large": {"flagged": False, "probability": 0.001}}},
]
ARENA_EXPECTED = [oriented([r["conversation_a"][0]], r["conversation_a"][1:], r["conversation_b"][1:],
                           [{"model_a": 1.0, "model_b": 0.0}.get(r["winner"], 0.5)]) for r in ARENA]

BINARIZED = [  # HuggingFaceH4/ultrafeedback_binarized
    {"prompt": "Name a planet.", "prompt_id": "9b3c1f",
     "chosen": [msg("user", "Name a planet."), msg("assistant", "Mars.")],
     "rejected": [msg("user", "Name a planet."), msg("assistant", "The Moon.")],
     "messages": [msg("user", "Name a planet."), msg("assistant", "Mars.")], "score_chosen": 9.0, "score_rejected": 3.0},
]

ULTRAFEEDBACK = [  # openbmb/UltraFeedback
    {"source": "evol_instruct", "instruction": "Name a colour.", "models": ["alpaca-7b", "gpt-4", "falcon-40b"],
     "completions": [
         {"annotations": {"helpfulness": {"Rating": "4"}}, "critique": "ok", "custom_system_prompt": "",
          "fine-grained_score": 4.25, "model": "alpaca-7b", "overall_score": 6.0, "principle": "helpfulness",
          "response": "Red."},
         {"annotations": {"helpfulness": {"Rating": "5"}}, "critique": "good", "custom_system_prompt": "",
          "fine-grained_score": 4.75, "model": "gpt-4", "overall_score": 8.5, "principle": "helpfulness",
          "response": "Blue."},
         {"annotations": {"helpfulness": {"Rating": "1"}}, "critique": "bad", "custom_system_prompt": "",
          "fine-grained_score": 1.5, "model": "falcon-40b", "overall_score": 2.0, "principle": "helpfulness",
          "response": "A car."}],
     "correct_answers": ["None"], "incorrect_answers": ["None"]},
]

STACK = [  # HuggingFaceH4/stack-exchange-preferences
    {"qid": 4, "question": "How do I reverse a list in Python?",
     "answers": [{"answer_id": 7, "author": "a", "author_id": 1, "author_profile": "https://x/1", "pm_score": 5,
                  "selected": True, "text": "Use reversed()."},
                 {"answer_id": 8, "author": "b", "author_id": 2, "author_profile": "https://x/2", "pm_score": -1,
                  "selected": False, "text": "You can't."},
                 {"answer_id": 9, "author": "c", "author_id": 3, "author_profile": "https://x/3", "pm_score": 2,
                  "selected": False, "text": "Slice with [::-1]."}],
     "date": "2008/07/31", "metadata": ["https://stackoverflow.com/questions/4"]},
]

NECTAR = [  # berkeley-nest/Nectar: rank 1 is the best
    {"prompt": "\n\nHuman: Name a fruit.\n\nAssistant:",
     "answers": [{"answer": "A rock.", "model": "llama-2-7b-chat", "rank": 3.0},
                 {"answer": "An apple.", "model": "gpt-4", "rank": 1.0},
                 {"answer": "A tomato, botanically.", "model": "gpt-3.5-turbo", "rank": 2.0}],
     "turns": 1, "num_responses": 3, "source": ["sharegpt"], "good_natured": True},
]

PANDALM_ROWS = [  # the shared PandaLM test set's schema
    {"motivation_app": "Grammarly", "instruction": "Fix the grammar.", "input": "he go home", "cmp_key": "a_b",
     "idx": 7, "response1": "He goes home.", "response2": "He go home.", "annotator1": 1, "annotator2": 1,
     "annotator3": 0},
    {"motivation_app": "Grammarly", "instruction": "Fix the grammar.", "input": "she run", "cmp_key": "a_b",
     "idx": 8, "response1": "She run.", "response2": "She runs.", "annotator1": 2, "annotator2": 2, "annotator3": 1},
]
PANDALM_SHARE = {0: 0.5, 1: 1.0, 2: 0.0}
PANDALM_EXPECTED = [oriented(r["instruction"] + "\n\n" + r["input"], r["response1"], r["response2"],
                             [PANDALM_SHARE[r[f"annotator{j}"]] for j in (1, 2, 3)]) for r in PANDALM_ROWS]

HH = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}]
GPTJ = [{"prompt": "Write a greeting.", "chosen": "Hello there!", "rejected": "Go."}]

# preset -> (rows, detected preset or None, expected (prompt, completions, alpha, n_votes) or K-wise (prompt,
# completions, human scores higher-better))
CASES = {
    "shp": (SHP, "shp", SHP_EXPECTED),
    "llmbar": (LLMBAR, "llmbar", LLMBAR_EXPECTED),
    "pku-saferlhf": (PKU, "pku-saferlhf", PKU_EXPECTED["better_response_id"]),
    "pku-saferlhf-safer": (PKU, "pku-saferlhf", PKU_EXPECTED["safer_response_id"]),
    "alpacafarm-human-preference": (ALPACA_PREFERENCE, "alpacafarm-human-preference", ALPACA_PREFERENCE_EXPECTED),
    "alpacafarm-cross-annotations": (ALPACA_CROSS, "alpacafarm-cross-annotations", ALPACA_EXPECTED),
    "alpacafarm-human-annotations": (ALPACA_ANNOTATIONS, "alpacafarm-human-annotations", ALPACA_EXPECTED),
    "alpaca-eval-annotations": (ALPACA_EVAL_WEIGHTED, "alpaca-eval-annotations",
                                alpaca_eval_expected(ALPACA_EVAL_WEIGHTED)),
    "mt-bench-human-judgments": (MT_BENCH, "mt-bench-human-judgments", MT_EXPECTED),
    "chatbot-arena-conversations": (ARENA, "chatbot-arena-conversations", ARENA_EXPECTED),
    "pandalm": (PANDALM_ROWS, "pandalm", PANDALM_EXPECTED),
    "auto-j-pairwise": (AUTOJ, "auto-j-pairwise", AUTOJ_EXPECTED),
    "ultrafeedback-binarized": (BINARIZED, "ultrafeedback-binarized", [
        ([r["chosen"][0]], [r["chosen"][1:], r["rejected"][1:]], None, None) for r in BINARIZED]),
    "anthropic-hh": (HH, None, [("\n\nHuman: Hi\n\nAssistant:", [" Hello!", " Go away."], None, None)]),
    "synthetic-instruct-gptj-pairwise": (GPTJ, None, [(r["prompt"], [r["chosen"], r["rejected"]], None, None)
                                                      for r in GPTJ]),
    "ultrafeedback": (ULTRAFEEDBACK, "ultrafeedback", [
        (r["instruction"], [c["response"] for c in r["completions"]], [c["overall_score"] for c in r["completions"]])
        for r in ULTRAFEEDBACK]),
    "stack-exchange-preferences": (STACK, "stack-exchange-preferences", [
        (r["question"], [a["text"] for a in r["answers"]], [float(a["pm_score"]) for a in r["answers"]]) for r in STACK]),
    "nectar": (NECTAR, "nectar", [
        (r["prompt"], [a["answer"] for a in r["answers"]], [-a["rank"] for a in r["answers"]]) for r in NECTAR]),
}


def test_every_preset_has_a_case():
    assert set(CASES) == set(PRESETS)


@pytest.mark.parametrize("name", list(CASES))
def test_preset_reads_its_mirror_rows_as_converted_here(tmp_path, name):
    rows, detected, expected = CASES[name]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert detect(rows[0]) == detected
    forced_cols, forced = open_examples(path, preset_columns(name))
    auto_cols, auto = open_examples(path, Columns(format="auto"))
    assert forced_cols.format == name and auto_cols.format == detected
    forced = list(forced)
    assert all(ex.error is None for ex in forced), [ex.error for ex in forced]
    kwise = forced_cols.completions is not None
    got = [(ex.prompt, ex.completions, ex.human_scores) if kwise else (ex.prompt, ex.completions, ex.alpha, ex.n_votes)
           for ex in forced]
    assert got == expected
    if detected == name or detected is None:  # auto detection reads them the same way
        assert [(ex.prompt, ex.completions, ex.alpha, ex.human_scores) for ex in auto] == \
               [(ex.prompt, ex.completions, ex.alpha, ex.human_scores) for ex in forced]


def test_detection_never_picks_a_preset_that_would_drop_or_miss_a_column(tmp_path):
    """A row must hold every column a preset reads (its id too) and message lists where the preset
    reads messages; else the default mapping reads it, with its own prompt column."""
    text = {"prompt": "What is 2+2?", "prompt_id": "a", "chosen": "The answer is 4.", "rejected": "The answer is 5.",
            "score_chosen": 9.0, "score_rejected": 2.0}
    assert detect(text) is None
    cols, examples = open_examples(write_jsonl(tmp_path / "t.jsonl", [text]), Columns(format="auto"))
    (ex,) = list(examples)
    assert cols.format is None and (ex.prompt, ex.completions) == (text["prompt"], [text["chosen"], text["rejected"]])
    assert detect(dict(BINARIZED[0])) == "ultrafeedback-binarized"
    for preset, rows, id_col in (("pandalm", PANDALM_ROWS, "idx"), ("chatbot-arena-conversations", ARENA, "question_id"),
                                 ("ultrafeedback-binarized", BINARIZED, "prompt_id")):
        assert detect(rows[0]) == preset
        assert detect({k: v for k, v in rows[0].items() if k != id_col}) != preset, preset


def test_turn_two_rows_are_marked_multi_turn(tmp_path):
    examples = list(read_examples(write_jsonl(tmp_path / "d.jsonl", MT_BENCH), Columns(format="auto")))
    assert [ex.multi_turn for ex in examples] == [False, True]
    arena = list(read_examples(write_jsonl(tmp_path / "a.jsonl", ARENA), Columns(format="auto")))
    assert [ex.multi_turn for ex in arena] == [False, True]
    assert [ex.id for ex in arena] == [r["question_id"] for r in ARENA]
    short = dict(MT_BENCH[0], conversation_a=MT_BENCH[0]["conversation_a"][:2], turn=2)
    ex = list(read_examples(write_jsonl(tmp_path / "s.jsonl", [short]), preset_columns("mt-bench-human-judgments")))
    assert ex[0].error == "'conversation_a' has 1 user messages: it has no turn 2"


# ---------------------------------------------------------------- votes grouped into pairs

VOTE_COLS = Columns(prompt=["q"], chosen="a", rejected="b", votes=["v"], group_by=["q", "a", "b"])


def test_grouping_pools_non_adjacent_votes_in_first_row_order(tmp_path):
    rows = [{"q": "Q1", "a": "x", "b": "y", "v": 1, "id": "r0"},
            {"q": "Q2", "a": "u", "b": "w", "v": 2, "id": "r1"},
            {"q": "Q3", "a": "s", "b": "t", "v": 1, "id": "r2"},  # judged once
            {"q": "Q2", "a": "u", "b": "w", "v": 2, "id": "r3"},
            {"q": "Q1", "a": "x", "b": "y", "v": 0, "id": "r4"},
            {"q": "Q4", "a": "m", "b": "n", "v": 1, "id": "r5"},
            {"q": "Q2", "a": "u", "b": "w", "v": 1, "id": "r6"},
            {"q": "Q4", "a": "m", "b": "n", "v": 2, "id": "r7"}]  # Q4: 1 vs 1, an exact tie
    path = write_jsonl(tmp_path / "votes.jsonl", rows)
    examples = list(read_examples(path, VOTE_COLS))
    assert [(ex.index, ex.id, ex.prompt, ex.completions, ex.alpha, ex.n_votes, ex.reoriented) for ex in examples] == [
        (0, "r0", "Q1", ["x", "y"], 0.75, 2, False), (1, "r1", "Q2", ["w", "u"], 2 / 3, 3, True),
        (2, "r2", "Q3", ["s", "t"], 1.0, 1, False), (3, "r5", "Q4", ["m", "n"], 0.5, 2, False)]
    assert [ex.id for ex in read_examples(path, VOTE_COLS, limit=2)] == ["r0", "r1"]
    assert [ex.id for ex in read_examples(path, VOTE_COLS)] == ["r0", "r1", "r2", "r5"]  # the same every run


def test_grouping_errors_stay_in_place(tmp_path):
    rows = [{"q": "Q1", "a": "x", "b": "y", "v": 1, "p": "same"},
            {"q": "Q2", "a": "u", "b": "w", "v": 7, "p": "same"},  # a bad vote: its pair is an error
            {"q": "Q1", "a": "x", "b": "y", "v": 2, "p": "other"},  # same key, other prompt text
            {"q": "Q2", "a": "u", "b": "w", "v": 1, "p": "same"},
            {"a": "x", "b": "y", "v": 1, "p": "same"}]  # no key
    path = write_jsonl(tmp_path / "votes.jsonl", rows)
    with open(path, "a") as f:
        f.write("{broken\n")
    cols = Columns(prompt=["p"], chosen="a", rejected="b", votes=["v"], group_by=["q", "a", "b"])
    errors = [ex.error for ex in read_examples(path, cols)]
    assert errors == ["rows 0 and 2 are one pair (same q, a, b) but their prompts differ",
                      "'v': 7 is not a vote in the 1/2 coding (1 = the first candidate (the chosen column), 2 = the second "
                      "(the rejected column), 0 = tie)",
                      "missing field 'q'", errors[3]]
    assert errors[3].startswith("line 6: invalid JSON")
    rows[2]["p"] = "same"
    rows[2]["b"] = "z"  # the candidates differ within a group keyed without them
    path = write_jsonl(tmp_path / "v2.jsonl", rows[:3])
    cols = Columns(prompt=["p"], chosen="a", rejected="b", votes=["v"], group_by=["q"])
    assert next(iter(read_examples(path, cols))).error == \
        "rows 0 and 2 are one pair (same q) but their completions differ"
    with pytest.raises(InputError, match=r"^group_by pools the votes of a pair's rows: it needs vote columns \(votes\)"):
        read_examples(path, Columns(prompt=["p"], chosen="a", rejected="b", group_by=["q"]))


GROUP_SCRIPT = textwrap.dedent("""
    import json, sys
    from prefrank.data import Columns, read_examples

    def peak_kb():  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over exec)
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])

    cols = Columns(prompt=["q"], chosen="a", rejected="b", votes=["v"], group_by=["q"])
    examples = read_examples(sys.argv[1], cols)
    before = peak_kb()
    n = errors = 0
    alphas = {}
    for ex in examples:
        n += 1
        errors += ex.error is not None
        if ex.index % 997 == 0:
            alphas[ex.index] = (ex.id, ex.alpha, ex.n_votes, ex.reoriented)
    grown = peak_kb() - before
    print(json.dumps({"pairs": n, "errors": errors, "grown_kb": grown, "alphas": alphas}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory is read from /proc (Linux)")
def test_grouping_streams_a_vote_file_larger_than_its_memory(tmp_path):
    """~100 MB of votes (3 per pair, spread over the whole file) grouped in a subprocess whose peak
    memory grows by a fraction of that; every pair comes out once, in first-row order."""
    n_pairs, text = 6000, "lorem ipsum " * 240  # ~2.9 kB a completion
    path = tmp_path / "votes.jsonl"
    with open(path, "w") as f:
        for vote in range(3):
            for i in range(n_pairs):
                v = 1 if (i + vote) % 3 else 2  # pairs i % 3 == 0: votes 2, 1, 1; others mixed
                f.write(json.dumps({"q": f"q{i}", "a": f"{i} {text}", "b": f"{text} {i}", "v": v, "id": f"{i}-{vote}"})
                        + "\n")
    size_kb = path.stat().st_size // 1024
    assert size_kb > 90_000
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", GROUP_SCRIPT, str(path)], capture_output=True, text=True, env=env,
                         check=True)
    got = json.loads(out.stdout)
    assert (got["pairs"], got["errors"]) == (n_pairs, 0)
    assert got["grown_kb"] < size_kb / 4, (got["grown_kb"], size_kb)
    for index, (row_id, alpha, n_votes, reoriented) in got["alphas"].items():
        i = int(index)
        votes = [1 if (i + vote) % 3 else 2 for vote in range(3)]
        share1 = votes.count(1) / 3
        assert (row_id, alpha, n_votes, reoriented) == (f"{i}-0", max(share1, 1 - share1), 3, share1 < 0.5)


# ---------------------------------------------------------------- end to end through the CLI

def _table(path):
    return pq.read_table(path).to_pydict()


@needs_shared
def test_presets_score_as_the_converted_rows(tmp_path, capsys):
    """A label coding, votes grouped from one per row, K-wise ranks and conversational turn-2 rows,
    each scored through `prefrank score` with its format detected, equal the explicit rows
    converted here (same token ids, so the same numbers)."""
    template = tmp_path / "chat.jinja"
    template.write_text("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")

    def score(rows, name, *extra):
        data, out = write_jsonl(tmp_path / f"{name}.jsonl", rows), tmp_path / f"{name}.parquet"
        assert main(["score", "--data", data, "--model", str(STORIES), "--out", str(out), *extra]) == 0
        return _table(out)

    def explicit(expected, name, *extra):
        # the instruction presets' join without a chat template: a blank line ends the prompt
        end = "\n\n" if name in ("llmbar", "alpacafarm-cross-annotations") else ""
        rows = [{"id": str(i), "prompt": p if end == "" else p + end, "chosen": c[0], "rejected": c[1],
                 **({} if a is None else {"alpha": a})} for i, (p, c, a, _) in enumerate(expected)]
        return score(rows, name + "-explicit", *extra)

    for name, extra in (("llmbar", ()), ("alpacafarm-cross-annotations", ()),
                        ("mt-bench-human-judgments", ("--chat-template", str(template)))):
        rows, _, expected = CASES[name]
        got, want = score(rows, name, *extra), explicit(expected, name, *extra)
        for column in ("logp_chosen", "logp_rejected", "n_chosen", "n_rejected", "alpha", "status"):
            assert got[column] == want[column], (name, column)
        assert got["n_votes"] == [n for *_, n in expected]
        assert got["tie"] == [a == 0.5 for *_, a, _ in expected]
        assert got["reoriented"] == [r for r in ([False, True], [False, True, False, False], [False, True])[
            ("llmbar", "alpacafarm-cross-annotations", "mt-bench-human-judgments").index(name)]]
    assert got["multi_turn"] == [False, True]
    got = score(NECTAR, "nectar")
    p, completions, human = CASES["nectar"][2][0]
    want = score([{"prompt": p, "completions": completions, "scores": human}], "nectar-explicit",
                 "--completions-col", "completions")
    assert got["logps"] == want["logps"] and got["human_scores"] == [human]
    assert "1 reoriented" in capsys.readouterr().err


@needs_shared
def test_conversational_rows_without_a_template_fail_the_run(tmp_path, capsys):
    data = write_jsonl(tmp_path / "arena.jsonl", ARENA)
    assert main(["score", "--data", data, "--model", str(STORIES), "--out", str(tmp_path / "s.parquet")]) == 2
    err = capsys.readouterr().err
    assert "error: none of the 2 rows could be scored (the table is written); the first: row 0 (id " in err
    assert "the tokenizer has no chat template (--chat-template FILE, or chat_template= in the Python API, supplies " \
           "one)" in err
    assert _table(tmp_path / "s.parquet")["status"] == ["error", "error"]
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    assert main(["score", "--data", data, "--model", str(STORIES), "--out", str(tmp_path / "t.parquet"),
                 "--chat-template", str(tmp_path / "bad.jinja")]) == 2
    assert "chat template" in capsys.readouterr().err


@needs_shared
def test_chat_template_renders_like_the_text_it_stands_for(tmp_path):
    """A conversational row under --chat-template scores as the explicit text the template renders
    (rendered here with jinja2 itself, BOS written as the template writes it)."""
    import jinja2
    source = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
             "{% if add_generation_prompt %}assistant:{% endif %}"
    (tmp_path / "chat.jinja").write_text(source)
    prompt, chosen, rejected = [msg("user", "Tell a story.")], [msg("assistant", " Once upon a time.")], \
        [msg("assistant", " The end.")]
    render = jinja2.Template(source, keep_trailing_newline=True).render
    head = render(messages=prompt, bos_token="<s>", add_generation_prompt=True)
    texts = [render(messages=prompt + c, bos_token="<s>", add_generation_prompt=False)[len(head):]
             for c in (chosen, rejected)]
    conv = write_jsonl(tmp_path / "conv.jsonl", [{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"prompt": head.removeprefix("<s>"), "chosen": texts[0],
                                                  "rejected": texts[1]}])
    for data, out in ((conv, "conv.parquet"), (text, "text.parquet")):
        assert main(["score", "--data", data, "--model", str(STORIES), "--out", str(tmp_path / out),
                     "--chat-template", str(tmp_path / "chat.jinja")]) == 0
    a, b = _table(tmp_path / "conv.parquet"), _table(tmp_path / "text.parquet")
    assert a["status"] == ["ok"] and (a["logp_chosen"], a["n_chosen"]) == (b["logp_chosen"], b["n_chosen"])


@needs_shared
def test_report_reads_the_mapping_from_the_sidecar(tmp_path, capsys):
    """`report --data` without column options quotes the pairs as they were scored: the format,
    its grouping and the orientation (the pair reoriented by its votes quotes its raters' choice)."""
    data = write_jsonl(tmp_path / "cross.jsonl", ALPACA_CROSS)
    out, ref = tmp_path / "s.parquet", str(STORIES)
    assert main(["score", "--data", data, "--model", ref, "--ref-model", ref, "--out", str(out)]) == 0
    assert main(["report", str(out), "--out", str(tmp_path / "rep"), "--data", data]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "  - chosen: 4\n  - rejected: 5" in text  # "Add 2 and 2.": output_2 won 3 of 4
    assert "| pairs the raters tied (α = 0.5) | 1, left out: every measure below is over the other 3 |" in text
    assert "| pairs reoriented to the raters' choice when scored" in text

    # without its sidecar the table no longer says how the data was read: an error, unless the columns are given
    (tmp_path / "s.parquet.meta.json").rename(tmp_path / "elsewhere.json")
    capsys.readouterr()
    assert main(["report", str(out), "--out", str(tmp_path / "rep2"), "--data", data]) == 2
    assert "cannot read" in capsys.readouterr().err and not (tmp_path / "rep2").exists()
    assert main(["report", str(out), "--out", str(tmp_path / "rep3"), "--data", data, "--format",
                 "alpacafarm-cross-annotations"]) == 0
    assert "  - chosen: 4\n  - rejected: 5" in (tmp_path / "rep3" / "report.md").read_text()


# ---------------------------------------------------------------- the analysis: ties, orientation, old tables

def scores_table(path, alpha, pol, ref, **extra):
    n = len(alpha)
    table = {"id": [str(i) for i in range(n)], "logp_chosen": [p[0] for p in pol], "logp_rejected": [p[1] for p in pol],
             "n_chosen": [3] * n, "n_rejected": [4] * n, "ref_logp_chosen": [r[0] for r in ref],
             "ref_logp_rejected": [r[1] for r in ref], "alpha": alpha, "truncated": [False] * n, "status": ["ok"] * n,
             "error": [None] * n, **extra}
    pq.write_table(pa.table(table), path)
    return str(path)


def test_ties_are_left_out_and_counted(tmp_path, capsys):
    pol = [[-1, -2], [-3, -1], [-2, -2.5], [-4, -1]]
    ref = [[-2, -1], [-1, -2], [-1, -3], [-2, -1]]
    alpha = [1.0, 0.75, 0.5, 0.5]
    path = scores_table(tmp_path / "s.parquet", alpha, pol, ref, n_votes=[1, 4, 2, 4], tie=[False, False, True, True],
                        reoriented=[False, True, False, False], multi_turn=[False] * 4)
    assert main(["analyze", path, "--out", str(tmp_path / "a.json"), "--betas", "1", "--beta", "1"]) == 0
    s = json.loads((tmp_path / "a.json").read_text())
    assert (s["n_pairs"], s["n_ties"], s["n_ranked"], s["n_reoriented"]) == (4, 2, 2, 1)
    untied = [0, 1]
    assert s["ranking_accuracy"]["value"] == np.mean([pol[i][0] >= pol[i][1] for i in untied])  # 1/2
    ideal = [ref[i][0] - ref[i][1] + np.log(np.clip(alpha[i], 1e-3, 1 - 1e-3) / (1 - np.clip(alpha[i], 1e-3, 1 - 1e-3)))
             > 0 for i in untied]
    assert s["idealized"]["raw"]["per_beta"]["1.0"] == np.mean(ideal)
    assert "2 tied, left out of the rankings; 1 reoriented" in capsys.readouterr().err
    assert main(["analyze", path, "--out", str(tmp_path / "b.json"), "--betas", "1", "--tie-band", "0.6"]) == 0
    s = json.loads((tmp_path / "b.json").read_text())
    # with the band the ties count: pair 2 within 0.5 of each other (correct), pair 3 not; the idealized
    # policy's tie is the reference's difference: 2 (no), 1 (no)
    assert s["n_ranked"] == 4 and s["ranking_accuracy"]["value"] == np.mean([True, False, True, False])
    assert s["idealized"]["raw"]["per_beta"]["1.0"] == np.mean(ideal + [False, False])


def test_old_tables_load_and_warn_about_rater_rejected_chosen(tmp_path, capsys):
    """A table without n_votes/tie/reoriented (an older prefrank, or --keep-column-order) still
    loads; pairs whose alpha < 0.5 are counted in column order, with a warning and a report line."""
    path = scores_table(tmp_path / "old.parquet", [0.25, 1.0, 0.5], [[-1, -2], [-2, -1], [-1, -1]],
                        [[-1, -2], [-2, -1], [-1, -3]])
    assert main(["analyze", path, "--out", str(tmp_path / "a.json")]) == 0
    s = json.loads((tmp_path / "a.json").read_text())
    assert (s["n_chosen_rejected_by_raters"], s["n_ties"], s["n_reoriented"], s["n_ranked"]) == (1, 1, 0, 2)
    assert "WARNING: on 1 pairs the raters preferred the rejected completion" in capsys.readouterr().err
    assert main(["report", path, "--out", str(tmp_path / "rep")]) == 0
    assert ("pairs whose chosen completion most raters reject (α < 0.5): read in column order "
            "(keep_column_order), they count as labelled** | 1 |") in (tmp_path / "rep" / "report.md").read_text()


def test_keep_column_order_is_recorded_and_warned(tmp_path, capsys):
    rows = [{"prompt": "Q", "chosen": " a", "rejected": " b", "alpha": 0.25}]
    from prefrank.analysis import load_pairs, summarize
    kept = list(read_examples(write_jsonl(tmp_path / "d.jsonl", rows), Columns(keep_column_order=True)))
    assert kept[0].alpha == 0.25 and not kept[0].reoriented
    path = scores_table(tmp_path / "s.parquet", [0.25], [[-1, -2]], [[-1, -2]])
    assert summarize(load_pairs(path))["n_chosen_rejected_by_raters"] == 1


def test_loss_plot_frames_its_points(tmp_path, monkeypatch):
    """The Theorem 4.1 curve spans hundreds of decades on a log axis; the axis shows the points."""
    import matplotlib.figure

    from prefrank.analysis import metrics, report
    limits = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: limits.append(fig.axes[0].get_ylim()))
    rng = np.random.default_rng(0)
    ref = rng.normal(-30, 40, (200, 2))  # difficulties far from 0: the curve reaches ~1e-150 and ~1e2
    pol = ref + rng.normal(0, 1, (200, 2))
    theorem = metrics.theorem41(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], 10.0)
    report.plot_loss_vs_c(theorem, 10.0, tmp_path / "p.png")
    low, high = limits[0]
    loss = theorem["loss"]
    assert low <= loss.min() and loss.max() <= high and high / low < 100 * loss.max() / loss.min()


def test_grouped_runs_resume_to_the_same_table(tmp_path, monkeypatch):
    """Grouped pairs come out in the same order every run: a run killed after two parts and
    resumed gives the table of an uninterrupted run."""
    from prefrank.demo.default import build_tokenizer
    from prefrank.io import Parts
    from tiny_models import tiny_model
    model = tmp_path / "model"
    tiny_model("llama").save_pretrained(model)
    build_tokenizer().save_pretrained(model)
    rng = np.random.default_rng(0)
    rows = [{"q": f"Q: {i}+1=?\nA:", "a": f" {i + 1}", "b": f" {i + 2}", "v": int(rng.integers(1, 3))}
            for _ in range(3) for i in rng.permutation(20)]
    data = write_jsonl(tmp_path / "votes.jsonl", rows)
    args = ["--data", data, "--model", str(model), "--prompt-cols", "q", "--chosen-col", "a", "--rejected-col", "b",
            "--vote-cols", "v", "--group-by", "q", "--chunk-rows", "3"]
    assert main(["score", *args, "--out", str(tmp_path / "clean.parquet")]) == 0
    written, real_write = [], Parts.write

    def write_then_crash(self, chunk, *a, **k):
        if len(written) == 2:
            raise KeyboardInterrupt
        real_write(self, chunk, *a, **k)
        written.append(chunk)

    monkeypatch.setattr(Parts, "write", write_then_crash)
    assert main(["score", *args, "--out", str(tmp_path / "s.parquet")]) == 130
    monkeypatch.setattr(Parts, "write", real_write)
    assert main(["score", *args, "--out", str(tmp_path / "s.parquet"), "--resume"]) == 0
    clean, resumed = _table(tmp_path / "clean.parquet"), _table(tmp_path / "s.parquet")
    assert resumed == clean and len(clean["id"]) == 20 and set(clean["n_votes"]) == {3}
    first_rows = list(dict.fromkeys(r["q"] for r in rows))  # pairs in the order of their first row
    assert clean["id"] == [str(rows.index(next(r for r in rows if r["q"] == q))) for q in first_rows]


def test_pairs_and_help_know_the_formats(tmp_path, capsys):
    """`prefrank pairs` reads a K-wise format as detected (Nectar: rank 1 is the best), and
    `score --help` lists every format."""
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", write_jsonl(tmp_path / "nectar.jsonl", NECTAR), "--pairing", "best-worst",
                 "--out", str(out)]) == 0
    pair = json.loads(out.read_text())
    assert (pair["chosen"], pair["rejected"]) == ("An apple.", "A rock.")
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in PRESETS) and "--chat-template" in text and "--group-by" in text


def test_a_column_option_alone_names_the_format_it_turned_off(tmp_path):
    """--vote-coding 0/1 alone on PandaLM rows reads the default mapping (no chosen column): the
    error says the first row looks like pandalm and how to start from its mapping (tryout)."""
    path = write_jsonl(tmp_path / "p.jsonl", PANDALM_ROWS)
    with pytest.raises(InputError) as caught:
        open_examples(path, Columns(vote_coding="0/1"))
    assert "unknown column(s) 'chosen', 'rejected'" in str(caught.value)
    assert "looks like pandalm" in str(caught.value) and "add format pandalm to start" in str(caught.value)


# ---------------------------------------------------------------- AlpacaEval's annotations: a model's probability as alpha

def test_alpaca_eval_annotations_are_detected_and_read_from_the_raw_preference(tmp_path):
    """Both kinds of AlpacaEval annotation files (a JSON array, as published) are detected from
    their columns and read with alpha from the raw preference; with an `input` column the rows are
    AlpacaFarm's and their preset reads them."""
    for rows in (ALPACA_EVAL_HARD, ALPACA_EVAL_WEIGHTED):
        path = tmp_path / "annotations.json"
        path.write_text(json.dumps(rows, indent=2))
        cols, examples = open_examples(str(path), Columns(format="auto"))
        assert cols.format == "alpaca-eval-annotations" and cols.vote_coding == "alpaca-eval"
        got = [(ex.prompt, ex.completions, ex.alpha, ex.n_votes) for ex in examples]
        assert got == alpaca_eval_expected(rows)
    assert detect({**ALPACA_EVAL_WEIGHTED[0], "input": ""}) == "alpacafarm-human-annotations"


def test_optional_prompt_parts_may_be_absent_and_a_missing_column_is_named_once(tmp_path):
    """AlpacaFarm's and PandaLM's `input` may be left out (the format still detected; read as
    empty, as their own rows with an empty input read); a null one is still a row error; a column named twice by a mapping
    (prompt and group_by) and missing is named once."""
    for name, rows in (("alpacafarm-human-annotations", ALPACA_ANNOTATIONS),
                       ("alpacafarm-human-preference", ALPACA_PREFERENCE), ("pandalm", PANDALM_ROWS)):
        empty = write_jsonl(tmp_path / "empty.jsonl", [{**r, "input": ""} for r in rows])
        absent = write_jsonl(tmp_path / "absent.jsonl", [{k: v for k, v in r.items() if k != "input"} for r in rows])
        assert detect({k: v for k, v in rows[0].items() if k != "input"}) == name
        want = [(ex.prompt, ex.completions, ex.alpha, ex.n_votes) for ex in read_examples(empty, preset_columns(name))]
        assert all(w[0] == r["instruction"] for w, r in zip(want, rows)), name
        got = [(ex.prompt, ex.completions, ex.alpha, ex.n_votes) for ex in read_examples(absent, preset_columns(name))]
        assert got == want, name
        null = write_jsonl(tmp_path / "null.jsonl", [{**rows[0], "input": None}])
        assert next(iter(read_examples(null, preset_columns(name)))).error == "field 'input' is null"
    path = write_jsonl(tmp_path / "v.jsonl", [{"q": "Q", "a": "x", "b": "y", "v": 1}])
    with pytest.raises(InputError) as caught:
        open_examples(path, Columns(prompt=["q", "ctx"], chosen="a", rejected="b", votes=["v"], group_by=["q", "ctx"]))
    assert str(caught.value).startswith("unknown column(s) 'ctx': the first row has 'q', 'a', 'b', 'v'")


@needs_shared
def test_alpaca_eval_annotation_files_score_and_analyze_in_one_command(tmp_path, capsys):
    """`prefrank score --data annotations.json --model M` with no column option, on both kinds of
    AlpacaEval files (the weighted one with a null preference): alpha on every scored row equals
    2 - preference (preference - 1 where the candidates were swapped), n_votes is null, the null
    row is an error in its place and the rest score as the explicit pairs converted here; then
    `prefrank analyze` reports the idealized accuracy, equal to a brute-force computation from the
    raw preferences, and says alpha is a model's probability."""
    model = str(STORIES)
    weighted = ALPACA_EVAL_WEIGHTED + alpaca_eval_rows("weighted_alpaca_eval_gpt4_turbo", "gpt4_1106_preview",
                                                       "tiny_model", [("Say bye.", "Bye!", "Ciao!", None)])
    for kind, rows in (("hard", ALPACA_EVAL_HARD), ("weighted", weighted)):
        (tmp_path / kind).mkdir()
        data, out = tmp_path / kind / "annotations.json", tmp_path / kind / "scores.parquet"
        data.write_text(json.dumps(rows, indent=2))
        assert main(["score", "--data", str(data), "--model", model, "--ref-model", model, "--out", str(out)]) == 0
        got = _table(out)
        scored = [r for r in rows if r["preference"] is not None]
        assert got["status"] == ["ok" if r["preference"] is not None else "error" for r in rows]
        assert got["error"][-1 if kind == "weighted" else 0] == ("field 'preference' is null" if kind == "weighted"
                                                                 else None)
        ok = [i for i, s in enumerate(got["status"]) if s == "ok"]
        expected = alpaca_eval_expected(scored)
        raw = [r["preference"] for r in scored]
        assert [got["alpha"][i] for i in ok] == [2 - p if 1 <= p <= 1.5 else p - 1 if p > 1.5 else 0.5 for p in raw]
        assert [got["alpha"][i] for i in ok] == [a for *_, a, _ in expected]
        assert [got["reoriented"][i] for i in ok] == [p > 1.5 for p in raw]
        assert [got["tie"][i] for i in ok] == [p in (1.5, 0) for p in raw]
        assert got["n_votes"] == [None] * len(rows)
        explicit = write_jsonl(tmp_path / kind / "explicit.jsonl", [
            {"prompt": prompt + "\n\n", "chosen": c[0], "rejected": c[1]} for prompt, c, _, _ in expected])
        assert main(["score", "--data", explicit, "--model", model, "--ref-model", model,
                     "--out", str(tmp_path / kind / "explicit.parquet")]) == 0
        want = _table(tmp_path / kind / "explicit.parquet")
        for column in ("logp_chosen", "logp_rejected", "ref_logp_chosen", "ref_logp_rejected", "n_chosen"):
            assert [got[column][i] for i in ok] == want[column], (kind, column)
        capsys.readouterr()
        assert main(["analyze", str(out), "--out", str(tmp_path / kind / "a.json"), "--betas", "0.1,1,10"]) == 0
        assert "prefrank: alpha: a model's probability, not human votes: column(s) preference in the alpaca-eval " \
               "coding" in capsys.readouterr().err
        s = json.loads((tmp_path / kind / "a.json").read_text())
        assert s["alpha_source"].startswith("a model's probability, not human votes")
        assert (s["n_pairs"], s["n_errors"], s["n_ties"]) == (len(scored), len(rows) - len(scored),
                                                              sum(p in (1.5, 0) for p in raw))
        eps = s["options"]["epsilon"]
        for beta in (0.1, 1.0, 10.0):  # brute force over the untied pairs, alpha from the raw preference
            correct = []
            for i, p in zip(ok, raw):
                if p in (1.5, 0):
                    continue
                a = min(max(p - 1 if p > 1.5 else 2 - p, eps), 1 - eps)
                correct.append(got["ref_logp_chosen"][i] - got["ref_logp_rejected"][i]
                               + math.log(a / (1 - a)) / beta > 0)
            print(kind, beta, s["idealized"]["raw"]["per_beta"][str(beta)], sum(correct) / len(correct))
            assert s["idealized"]["raw"]["per_beta"][str(beta)] == sum(correct) / len(correct)
        assert main(["report", str(out), "--out", str(tmp_path / kind / "rep")]) == 0
        assert "| α (the preference strength the idealized accuracy uses) | a model's probability" in \
            (tmp_path / kind / "rep" / "report.md").read_text()


@needs_shared
def test_vote_coding_prob_on_the_command_line(tmp_path, capsys):
    """A reward model's P(first better) column (`--vote-coding prob`): alpha is the probability of
    the side it prefers (1 - p where it prefers the second), n_votes null, and out-of-range or
    non-finite values are row errors naming the value."""
    ps = [0.8, 0.25, 0.5, 1.2, "nan", 0.0]
    rows = [{"prompt": f"Q{i}:", "chosen": f" a{i}", "rejected": f" b{i}", "p": p} for i, p in enumerate(ps)]
    out = tmp_path / "s.parquet"
    assert main(["score", "--data", write_jsonl(tmp_path / "d.jsonl", rows), "--model", str(STORIES),
                 "--vote-cols", "p", "--vote-coding", "prob", "--out", str(out)]) == 0
    got = _table(out)
    good = [isinstance(p, float) and 0 <= p <= 1 for p in ps]
    assert got["status"] == ["ok" if g else "error" for g in good]
    assert [a for a, g in zip(got["alpha"], good) if g] == [max(p, 1 - p) for p, g in zip(ps, good) if g]
    assert [r for r, g in zip(got["reoriented"], good) if g] == [p < 0.5 for p, g in zip(ps, good) if g]
    assert got["n_votes"] == [None] * len(ps)
    assert got["error"][3].startswith("'p': 1.2 is not a vote in the prob coding (P(the first candidate is better)")
    assert got["error"][4].startswith("'p': 'nan' is not a vote in the prob coding")
    assert read_sidecar(out)["alpha_source"] == ("a model's probability, not human votes: column(s) p in the prob "
                                                 "coding (n_votes is null)")


def _mt_bench_csv(path, encode):
    """MT_BENCH as a CSV whose conversation cells are `encode`d (pandas writes a list column as its
    Python repr; JSON is the other common choice)."""
    import csv
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(MT_BENCH[0]))
        writer.writeheader()
        for row in MT_BENCH:
            writer.writerow({k: encode(v) if isinstance(v, list) else v for k, v in row.items()})
    return str(path)


@pytest.mark.parametrize("encode", [repr, json.dumps], ids=["python-repr", "json"])
def test_conversations_stored_as_text_read_as_their_messages(tmp_path, encode):
    """The MT-Bench judgments as a CSV (conversation cells hold text): the same pairs, alpha, votes
    and turn cuts as the published message lists (MT_EXPECTED, converted by hand)."""
    path = _mt_bench_csv(tmp_path / "mt.csv", encode)
    examples = list(read_examples(path, preset_columns("mt-bench-human-judgments")))
    assert [(ex.prompt, ex.completions, ex.alpha, ex.n_votes) for ex in examples] == MT_EXPECTED
    assert [ex.multi_turn for ex in examples] == [False, True]


@needs_shared
def test_the_mt_bench_csv_scores_as_the_message_lists_do(tmp_path, capsys):
    template = tmp_path / "chat.jinja"
    template.write_text("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")
    tables = []
    for data in (_mt_bench_csv(tmp_path / "mt.csv", repr), write_jsonl(tmp_path / "mt.jsonl", MT_BENCH)):
        out = tmp_path / (Path(data).name + ".parquet")
        assert main(["score", "--data", data, "--model", str(STORIES), "--format", "mt-bench-human-judgments",
                     "--chat-template", str(template), "--out", str(out)]) == 0
        tables.append(_table(out))
    csv_table, jsonl_table = tables
    for column in ("logp_chosen", "logp_rejected", "n_chosen", "n_rejected", "alpha", "n_votes", "tie", "multi_turn"):
        assert csv_table[column] == jsonl_table[column], column
    assert csv_table["n_chosen"][0] != csv_table["n_chosen"][1]  # turn 1 and turn 2 are cut differently


@needs_shared
def test_text_where_messages_belong_is_a_row_error_and_a_turn_that_cuts_nothing_is_refused(tmp_path, capsys):
    rows = [dict(MT_BENCH[0], conversation_a="[{'role': 'user'}] + __import__('os').system('echo hi')"),
            dict(MT_BENCH[0], conversation_a="just text")]
    examples = list(read_examples(write_jsonl(tmp_path / "bad.jsonl", rows), preset_columns(
        "mt-bench-human-judgments", group_by=None, turn=None)))
    assert [ex.error for ex in examples] == ["field 'conversation_a' holds text where a message list belongs, and the "
                                             "text is no list of messages (JSON, or a Python literal such as "
                                             "[{'role': 'user', 'content': '...'}, ...])"] * 2
    data = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "Q", "chosen": " a", "rejected": " b", "turn": 1}])
    assert main(["score", "--data", data, "--model", str(STORIES), "--turn-col", "turn",
                 "--out", str(tmp_path / "t.parquet")]) == 2
    assert "--turn-col 'turn' cuts conversations, but the first row's 'chosen' is no message list" in \
        capsys.readouterr().err


@needs_shared
def test_report_quotes_messages_as_text_marks_truncated_pairs_and_says_when_data_is_unused(tmp_path, capsys):
    template = tmp_path / "chat.jinja"
    template.write_text("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")
    data, out = write_jsonl(tmp_path / "mt.jsonl", MT_BENCH), tmp_path / "s.parquet"
    model = str(STORIES)
    assert main(["score", "--data", data, "--model", model, "--ref-model", model, "--chat-template", str(template),
                 "--max-length", "60", "--truncate", "keep-end", "--out", str(out)]) == 0
    truncated = _table(out)["truncated"]
    assert main(["report", str(out), "--out", str(tmp_path / "rep"), "--data", data]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    (prompt, completions, _, _), cut = MT_EXPECTED[1], truncated[1]  # the turn-2 pair: several messages
    quoted = " / ".join(f"{m['role']}: {m['content']}" for m in completions[0]).replace("\n", " ")
    assert f"  - chosen: {quoted[:200]}" in text and "[{'role'" not in text
    assert f"  - prompt: {prompt[0]['role']}: {prompt[0]['content']}" in text
    difficulty = json.loads((tmp_path / "rep" / "summary.json").read_text())["difficulty"]
    quoted_rows = [pair["row"] for key in ("hardest", "easiest") for pair in difficulty[key]]
    assert cut and text.count("(truncated to fit: scored on part of the text quoted)") == \
        sum(truncated[row] for row in quoted_rows) > 0
    policy_only = tmp_path / "p.parquet"
    assert main(["score", "--data", data, "--model", model, "--chat-template", str(template),
                 "--out", str(policy_only)]) == 0
    capsys.readouterr()
    assert main(["report", str(policy_only), "--out", str(tmp_path / "rep2"), "--data", data]) == 0
    assert "--data is read to quote the hardest and easiest pairs by the reference's difficulty; this table has " \
           "no reference log-probs (or is K-wise), so --data is not used" in capsys.readouterr().err
