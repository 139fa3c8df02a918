"""The column options of every command that reads data (where each field lives, how the verdict
reads) and the presets of prefrank.formats resolved into them."""

from prefrank import formats
from prefrank import votes as vote_codings  # the name `votes` is a Columns field
from prefrank.errors import InputError
from prefrank.options import escaped_text, name_list, option, options

SCORES_ORDERS = ("higher-better", "lower-better")


@options
class Columns:
    """Where each field lives in the input rows, and how the raters' verdict reads (the column
    options of every command that reads data)."""
    format: str | None = option(
        None, "a published dataset's column mapping (listed in `prefrank score --help`; README.md gives the "
        "columns each reads); auto: the one the first row's columns match, else the default mapping; column "
        "options given with it override its fields", choices=["auto", *formats.PRESETS], metavar="NAME",
        group="columns", default_text="auto on the command line when no column option is given")
    prompt: list[str] | None = option(
        None, "prompt column(s), joined by blank lines when several (empty ones skipped)", flag="--prompt-cols",
        type=name_list, group="columns", default_text="'prompt' if present, else the implicit HH format")
    join: str | None = option(
        None, "how a text prompt meets each answer: 'chat' renders the prompt as the user's message and the answer "
        "as the assistant's with the tokenizer's chat template (a blank line between them when it has none); any "
        "other text is put between them (escapes \\n, \\t read: --join '\\n\\n', --join ' '). Message rows are "
        "joined by the chat template, implicit transcripts as they are", type=escaped_text, metavar="TEXT",
        group="columns", default_text="the format's rule (instruction/response formats: chat), else the prompt "
        "and answer concatenated as given, as TRL does")
    chosen: str = option("chosen", "the chosen completion, or with votes the first candidate (the raters decide "
                         "which is chosen)", flag="--chosen-col", group="columns")
    rejected: str = option("rejected", "the rejected completion, or with votes the second candidate",
                           flag="--rejected-col", group="columns")
    id: str | None = option(None, "row id column, which must exist", flag="--id-col", group="columns",
                            default_text="'id' when present, else the row's index")
    votes: list[str] | None = option(
        None, "vote columns, one vote each in --vote-coding (a label column naming the better candidate is one "
        "vote column; PandaLM: annotator1,annotator2,annotator3); alpha = the share of votes for the chosen "
        "column, ties half, or with a probability coding (prob, alpaca-eval) the model's probability that the "
        "chosen column is better (n_votes then null). Without it, an 'alpha' column, or a 'votes' list of "
        "1/0/0.5, is used when present",
        flag="--vote-cols", type=name_list, group="columns")
    vote_coding: str = option("1/2", "what a vote says: " + "; ".join(
        f"{name}: {text}" for name, text in vote_codings.HELP.items()), metavar="CODING",
        group="columns")
    group_by: list[str] | None = option(
        None, "rows that agree on these columns are votes on one pair (one output row per pair, in the order "
        "of each pair's first row; 'a+b' is the unordered pair of columns a and b, so a pair shown in either "
        "order is one pair); their prompt and candidates must agree (swapped candidates flip a row's votes), "
        "else the pair is an error", type=name_list, group="columns")
    turn: str | None = option(None, "conversational rows: each conversation is cut after the answer to the user "
                              "message this column numbers (MT-Bench, Chatbot Arena: turn)", flag="--turn-col",
                              group="columns")
    keep_column_order: bool = option(
        False, "keep --chosen-col as chosen even where the votes prefer --rejected-col (the analysis then warns "
        "with the count); by default such pairs are swapped and marked reoriented", group="columns")
    completions: str | None = option(
        None, "K completions per prompt: the column with the list of completions (a dotted name reads a field "
        "of each listed object, e.g. completions.response for UltraFeedback); the table then holds lists "
        "(logps, n_tokens, human_scores)", flag="--completions-col", group="columns")
    human_scores: str = option("scores", "with --completions-col: human scores, one per completion "
                               "(UltraFeedback: completions.overall_score)", flag="--scores-col", group="columns")
    scores_order: str = option("higher-better", "higher-better, or lower-better for ranks (Nectar: answers.rank; "
                               "stored negated in human_scores)", choices=SCORES_ORDERS, group="columns")
    completions_include_prompt: bool = option(
        False, "chosen/rejected start with the prompt: strip it (rows where they don't are errors)",
        group="columns")
    prompt_separator: str = option("\n\n", "joins several prompt columns (empty ones skipped)", cli=False)
    messages: list[str] = option(
        help="columns that hold message lists: a string there (a CSV cell, a pandas export) is parsed as JSON or "
        "as a Python literal (never run) and must give one, else the row is an error; the presets name them",
        cli=False, default_factory=list)
    optional: list[str] = option(
        help="prompt columns a row may lack, read as empty (in the prompt and in group_by keys): AlpacaFarm's and "
        "PandaLM's input; the presets name them", cli=False, default_factory=list)

    def __post_init__(self):
        if self.vote_coding not in vote_codings.PROBABILITY:
            try:
                vote_codings.coding_map(self.vote_coding)
            except ValueError as e:
                raise InputError(f"<vote_coding>: {e}") from None
        if self.join is not None and self.completions_include_prompt:
            raise InputError("<join> joins a prompt to its answers, but with <completions_include_prompt> the answers "
                             "already hold their prompt")
        if self.group_by and (self.completions is not None or not self.votes):
            raise InputError("<group_by> pools the votes of a pair's rows: it needs vote columns (<votes>) and "
                             "pairs (not <completions>)")


def preset_columns(name: str, **overrides) -> Columns:
    """The named preset's column mapping (prefrank.formats), with `overrides` on top."""
    if name not in formats.PRESETS:
        raise InputError(f"unknown format {name!r}: expected auto or one of {', '.join(formats.PRESETS)}")
    return Columns(**{**formats.PRESETS[name].columns, **overrides, "format": name})


# options that say how the columns are read, not where: given alone they keep the format's
# detection on, and apply on top of the format detected
DETECTION_KEEPS = ("keep_column_order", "join")


def resolve_columns(cols: Columns, row: dict | None) -> Columns:
    """With format "auto": the preset that the first row's columns select (prefrank.formats), or
    the default mapping, with the DETECTION_KEEPS options given (join: when not None); any other
    mapping as it is."""
    if cols.format != "auto":
        return cols
    kept = {"keep_column_order": cols.keep_column_order, **({"join": cols.join} if cols.join is not None else {})}
    name = formats.detect(row) if row is not None else None
    return preset_columns(name, **kept) if name else Columns(**kept)
