"""Named column mappings (presets) for published preference datasets, and their detection.

A preset is nothing but the keyword arguments of a `prefrank.data.Columns` for one dataset's
published schema; `data.read_examples` picks one from the columns of the first row when asked to
(`--format auto`, the CLI's default when no column option is given), or uses the one named with
`--format NAME`. A preset whose `detect` is None is never picked automatically: its mapping is the
default one (HH, GPT-J), or another preset of the same dataset is the automatic choice (PKU-SafeRLHF
picks better_response_id; `pku-saferlhf-safer` reads safer_response_id). The first preset (in this
order) whose `detect` columns, and the id column it reads, are all in the first row, with message lists
in its message columns (Columns.messages) and none of its `absent` columns, wins, so the more specific schemas come
first: a row that lacks any of them is read with the default mapping (its own prompt, chosen and
rejected columns), never with a preset that would drop or misread a column. A preset's optional
prompt parts (Columns.optional: AlpacaFarm's `input`) may be absent from the rows it reads, and
from the rows that select it.

How a prompt meets its answers is part of a mapping (Columns.join). The presets whose prompt is an
instruction (or a post, a question) and whose answers are responses to it join them with "chat": the
instruction is the user's message and each answer the assistant's, rendered with the tokenizer's chat
template, or joined by a blank line for a tokenizer without one (a base model), never glued to the
instruction's last character. Transcripts (HH, Nectar) and message lists carry their own joins; the
default mapping takes explicit prompt and answer strings as given (TRL's concatenation).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    source: str  # where the dataset is published
    columns: dict  # Columns fields
    detect: tuple[str, ...] | None  # first-row columns that select it (None: only with --format)
    note: str = ""  # what the mapping decides
    absent: tuple[str, ...] = ()  # first-row columns that rule it out (another preset reads those rows)


# AlpacaFarm's human annotations and cross-annotations: one vote per row, grouped into pairs
_ALPACA_VOTES = dict(prompt=["instruction", "input"], chosen="output_1", rejected="output_2", votes=["preference"],
                     vote_coding="1/2", group_by=["instruction", "input", "output_1", "output_2"], optional=["input"],
                     join="chat")
_MT = dict(chosen="conversation_a", rejected="conversation_b", votes=["winner"], vote_coding="names", turn="turn",
           messages=["conversation_a", "conversation_b"])

PRESETS = {
    "anthropic-hh": Preset(
        "Anthropic/hh-rlhf", {}, None,
        "implicit: chosen/rejected transcripts, the prompt their shared prefix up to the last Assistant: (no votes)"),
    "synthetic-instruct-gptj-pairwise": Preset(
        "Dahoas/synthetic-instruct-gptj-pairwise", {}, None, "explicit prompt/chosen/rejected strings (no votes)"),
    "auto-j-pairwise": Preset(
        "GAIR-NLP/auto-j data/test/testdata_pairwise.jsonl",
        dict(prompt=["prompt"], chosen="response 1", rejected="response 2", votes=["label"],
             vote_coding="0=first,1=second,2=tie", join="chat"),
        ("scenario", "label", "prompt", "response 1", "response 2"),
        "label: 0 = response 1, 1 = response 2, 2 = tie (a quarter of the test set)"),
    "pandalm": Preset(
        "WeOpenML/PandaLM testset-v1.json",
        dict(prompt=["instruction", "input"], chosen="response1", rejected="response2", id="idx",
             votes=["annotator1", "annotator2", "annotator3"], vote_coding="1/2", optional=["input"],
             join="chat"),
        ("instruction", "input", "response1", "response2", "annotator1", "annotator2", "annotator3"),
        "three raters per pair: 1 = response1, 2 = response2, 0 = tie"),
    "shp": Preset(
        "stanfordnlp/SHP",
        dict(prompt=["history"], chosen="human_ref_A", rejected="human_ref_B", votes=["labels"], vote_coding="1/0",
             join="chat"),
        ("history", "human_ref_A", "human_ref_B", "labels"), "labels: 1 = A preferred, 0 = B"),
    "llmbar": Preset(
        "princeton-nlp/LLMBar",
        dict(prompt=["input"], chosen="output_1", rejected="output_2", votes=["label"], vote_coding="1/2", join="chat"),
        ("input", "output_1", "output_2", "label"), "label: 1 = output_1, 2 = output_2"),
    "pku-saferlhf": Preset(
        "PKU-Alignment/PKU-SafeRLHF",
        dict(prompt=["prompt"], chosen="response_0", rejected="response_1", votes=["better_response_id"],
             vote_coding="0/1", join="chat"),
        ("prompt", "response_0", "response_1", "better_response_id"),
        "the helpfulness preference: better_response_id 0 = response_0, 1 = response_1"),
    "pku-saferlhf-safer": Preset(
        "PKU-Alignment/PKU-SafeRLHF",
        dict(prompt=["prompt"], chosen="response_0", rejected="response_1", votes=["safer_response_id"],
             vote_coding="0/1", join="chat"),
        None, "the harmlessness preference: safer_response_id 0 = response_0, 1 = response_1"),
    # before the AlpacaFarm annotations, whose columns these files also have (but for `input`)
    "alpaca-eval-annotations": Preset(
        "tatsu-lab/alpaca_eval results/MODEL/ANNOTATOR/annotations.json",
        dict(prompt=["instruction"], chosen="output_1", rejected="output_2", votes=["preference"],
             vote_coding="alpaca-eval", join="chat"),
        ("instruction", "output_1", "generator_1", "output_2", "generator_2", "annotator", "preference"),
        "one judgment per row by a model: preference = 1 + P(output_2 is better) (weighted annotators; the 1/2 "
        "annotators' 1 and 2 read as probabilities 1 and 0), 1.5 and the legacy 0 a draw; alpha is the "
        "probability, n_votes null", absent=("input",)),
    "alpacafarm-cross-annotations": Preset(
        "tatsu-lab/alpaca_eval alpaca_farm_human_crossannotations", _ALPACA_VOTES,
        ("instruction", "output_1", "output_2", "preference", "annotator_index"),
        "one vote per row (preference 1 = output_1, 2 = output_2), grouped into pairs"),
    "alpacafarm-human-annotations": Preset(
        "tatsu-lab/alpaca_eval alpaca_farm_human_annotations", _ALPACA_VOTES,
        ("instruction", "output_1", "output_2", "preference", "annotator"),
        "one vote per row (preference 1 = output_1, 2 = output_2), grouped into pairs"),
    "alpacafarm-human-preference": Preset(
        "tatsu-lab/alpaca_farm alpaca_human_preference",
        dict(prompt=["instruction", "input"], chosen="output_1", rejected="output_2", votes=["preference"],
             vote_coding="1/2", optional=["input"], join="chat"),
        ("instruction", "input", "output_1", "output_2", "preference"),
        "one vote per pair: preference 1 = output_1, 2 = output_2"),
    "chatbot-arena-conversations": Preset(
        "lmsys/chatbot_arena_conversations", dict(_MT, id="question_id"),
        ("conversation_a", "conversation_b", "winner", "anony"),
        "one battle per row; winner model_a / model_b / tie / tie (bothbad); the whole conversation after the "
        "shared leading messages is scored"),
    "mt-bench-human-judgments": Preset(
        "lmsys/mt_bench_human_judgments (split human)",
        dict(_MT, group_by=["question_id", "turn", "model_a+model_b"]),
        ("question_id", "model_a", "model_b", "winner", "judge", "conversation_a", "conversation_b", "turn"),
        "one vote per row, grouped by question, turn and model pair (either order); conversations cut after "
        "the judged turn"),
    "ultrafeedback-binarized": Preset(
        "HuggingFaceH4/ultrafeedback_binarized",
        dict(prompt=[], id="prompt_id", messages=["chosen", "rejected"]),
        ("prompt", "chosen", "rejected", "score_chosen", "score_rejected"),
        "chosen/rejected message lists, the prompt their shared leading messages; score_chosen/score_rejected "
        "are not read"),
    "ultrafeedback": Preset(
        "openbmb/UltraFeedback",
        dict(prompt=["instruction"], completions="completions.response", human_scores="completions.overall_score",
             join="chat"),
        ("instruction", "completions"), "K completions, scored by overall_score (higher is better)"),
    "stack-exchange-preferences": Preset(
        "HuggingFaceH4/stack-exchange-preferences",
        dict(prompt=["question"], completions="answers.text", human_scores="answers.pm_score", id="qid", join="chat"),
        ("qid", "question", "answers"), "K answers, scored by pm_score (higher is better)"),
    "nectar": Preset(
        "berkeley-nest/Nectar",
        dict(prompt=["prompt"], completions="answers.answer", human_scores="answers.rank", scores_order="lower-better"),
        ("prompt", "answers", "turns"), "K answers, ranked by rank (1 is best)"),
}


def _selects(preset: Preset, row: dict) -> bool:
    named = preset.detect + ((preset.columns["id"],) if "id" in preset.columns else ())
    named = [c for c in named if c not in preset.columns.get("optional", ())]  # the preset reads rows without them
    return all(c in row for c in named) and not any(c in row for c in preset.absent) and all(
        isinstance(row[c], list) and all(isinstance(m, dict) for m in row[c]) for c in preset.columns.get("messages", ()))


def detect(row: dict) -> str | None:
    """The first preset that `row` selects (see the module's docstring), or None."""
    return next((name for name, p in PRESETS.items() if p.detect and _selects(p, row)), None)
