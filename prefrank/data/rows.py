"""One input row → an Example (prompt, completions, the raters' verdict) or a row error; the first
row's columns checked for the whole input. The formats and the verdict are described in
prefrank.data."""
import ast
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field

from prefrank import formats
from prefrank import votes as vote_codings  # the name `votes` is a Columns field
from prefrank.data.columns import Columns
from prefrank.data.readers import BadRow, json_kind
from prefrank.errors import InputError, RowError

HH_ASSISTANT = "\n\nAssistant:"


@dataclass
class Example:
    index: int  # position in the output: the input row, or with group_by the pair (groups in first-row order)
    id: str
    prompt: str | list | None = None  # text, or a list of chat messages
    completions: list = field(default_factory=list)  # [chosen, rejected], or K: texts or message lists
    alpha: float | None = None  # pairs: share of raters preferring chosen, or a model's P(chosen better)
    n_votes: int | None = None  # pairs: the votes alpha comes from (None: an alpha column, a probability, no votes)
    reoriented: bool = False  # the raters preferred the `rejected` column: the two were swapped
    multi_turn: bool = False  # a completion holds more than one message (later turns, earlier answers)
    human_scores: list[float] | None = None  # K-wise: human score per completion (higher is better)
    implicit: bool = False  # the prompt was split off full transcripts (no prompt in the row)
    join: str | None = None  # text rows: how the prompt meets each completion (Columns.join; None: as given)
    error: str | None = None

    @property
    def tie(self) -> bool | None:
        """The raters tied (alpha = 0.5: exact, a share of votes or a probability as given); None without alpha."""
        return None if self.alpha is None else self.alpha == 0.5

    @property
    def glued(self) -> bool:
        """A text prompt given with no join rule ends in a non-space character and a completion starts
        with one: as given, they are scored as one word ("weatherman.He")."""
        return (self.join is None and not self.implicit and isinstance(self.prompt, str) and self.prompt != ""
                and not self.prompt[-1].isspace()
                and any(isinstance(c, str) and c != "" and not c[0].isspace() for c in self.completions))


def _is_messages(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) for m in value)


_PARSE_ERRORS = (ValueError, TypeError, SyntaxError, MemoryError, RecursionError)


def _messages_from_text(value, column: str):
    """A message column's value: a list as it is; a string parsed as JSON, else as a Python literal
    (ast.literal_eval: pandas and `datasets` write list columns to CSV as their repr), which must be a
    list of messages."""
    if not isinstance(value, str):
        return value
    for parse in (json.loads, ast.literal_eval):
        try:
            parsed = parse(value.strip())
        except _PARSE_ERRORS:
            continue
        if _is_messages(parsed):
            return parsed
    raise RowError(f"field {column!r} holds text where a message list belongs, and the text is no list of messages "
                   f"(JSON, or a Python literal such as [{{'role': 'user', 'content': '...'}}, ...])")


def _check_messages(value, what: str) -> list:
    for m in value:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError(f"{what}: every message needs string 'role' and 'content'")
    return value


def row_field(row: dict, column: str):
    """row[column]; a dotted column "a.b" reads field b of each dict in the list row["a"]
    (UltraFeedback's completions.response)."""
    head, _, rest = column.partition(".")
    if head not in row:
        raise RowError(f"missing field {head!r}")
    value = row[head]
    if value is None:  # present but null: never read as empty, absent or implicit
        raise RowError(f"field {head!r} is null")
    if not rest:
        return value
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise RowError(f"field {head!r} must be a list of objects to read {column!r}")
    if any(rest not in v for v in value):
        raise RowError(f"missing field {rest!r} in an element of {head!r}")
    return [v[rest] for v in value]


def split_implicit_prompt(*texts: str) -> tuple[str, list[str]]:
    """(prompt, completions) from full transcripts that share their prompt."""
    common = os.path.commonprefix(list(texts))
    cut = common.rfind(HH_ASSISTANT)
    if cut >= 0:
        cut += len(HH_ASSISTANT)
    else:
        cut = max((i for i, c in enumerate(common) if c.isspace()), default=0)
    return texts[0][:cut], [t[cut:] for t in texts]


def _completions(row: dict, cols: Columns) -> tuple[list, list[str]]:
    """The row's raw completions and their names for messages."""
    if cols.completions is None:
        return [row_field(row, cols.chosen), row_field(row, cols.rejected)], [cols.chosen, cols.rejected]
    values = row_field(row, cols.completions)
    if not isinstance(values, list) or len(values) < 2:
        raise RowError(f"field {cols.completions!r} must be a list of at least 2 completions")
    return values, [f"{cols.completions}[{k}]" for k in range(len(values))]


def _prompt(row: dict, cols: Columns):
    """The prompt's text or messages; None when it is implicit (shared by the completions)."""
    if cols.prompt is None:
        return row_field(row, "prompt") if "prompt" in row else None  # absent: implicit; null: an error
    if not cols.prompt:
        return None
    names = [c for c in cols.prompt if c in row or c not in cols.optional]  # an absent optional part: empty
    parts = [row_field(row, c) for c in names]
    if len(parts) == 1:
        return parts[0]
    for c, p in zip(names, parts):
        if not isinstance(p, str):
            raise RowError(f"field {c!r} must be a string, got {type(p).__name__}")
    return cols.prompt_separator.join(p for p in parts if p)


def _integer(value, what: str) -> int:
    number = vote_codings.whole_number(value)
    if number is None:
        raise RowError(f"{what!r} must be an integer; got {value!r}")
    return number


def _cut_at_turn(conversation: list, turn: int, name: str) -> list:
    """The conversation up to the answer to its turn-th user message (the rest is not judged)."""
    users = [i for i, m in enumerate(conversation) if m["role"] == "user"]
    if turn < 1 or len(users) < turn:
        raise RowError(f"{name!r} has {len(users)} user messages: it has no turn {turn}")
    return conversation[:users[turn]] if len(users) > turn else conversation


def _prompt_and_completions(row: dict, cols: Columns) -> tuple:
    """(prompt, completions, whether the prompt was implicit)."""
    completions, names = _completions(row, cols)
    prompt = _prompt(row, cols)
    prompt_name = (cols.prompt or ["prompt"])[0]
    if cols.messages:
        completions = [_messages_from_text(c, n) if n in cols.messages else c for c, n in zip(completions, names)]
        prompt = _messages_from_text(prompt, prompt_name) if prompt_name in cols.messages else prompt
    if any(_is_messages(c) for c in completions):  # conversational
        for c, name in zip(completions, names):
            if not _is_messages(c):
                raise RowError(f"{name!r} must be a message list like the other completions")
            _check_messages(c, name)
        if cols.turn is not None:
            turn = _integer(row_field(row, cols.turn), cols.turn)
            completions = [_cut_at_turn(c, turn, name) for c, name in zip(completions, names)]
        if prompt is None:
            shared = 0
            while all(len(c) > shared and c[shared] == completions[0][shared] for c in completions):
                shared += 1
            return completions[0][:shared], [c[shared:] for c in completions], True
        if not _is_messages(prompt):
            raise RowError(f"{prompt_name!r} must be a message list when the completions are")
        return _check_messages(prompt, prompt_name), completions, False
    for c, name in zip(completions, names):
        if not isinstance(c, str):
            raise RowError(f"field {name!r} must be a string, got {type(c).__name__}")
    if cols.turn is not None:
        raise RowError(f"the turn column {cols.turn!r} cuts conversations, but this row's completions are text")
    if prompt is None:
        return *split_implicit_prompt(*completions), True
    if not isinstance(prompt, str):
        raise RowError(f"field {prompt_name!r} must be a string, got {type(prompt).__name__}")
    if cols.completions_include_prompt:
        for c, name in zip(completions, names):
            if not c.startswith(prompt):
                raise RowError(f"the prompt is not a prefix of {name!r}")
        completions = [c[len(prompt):] for c in completions]
    return prompt, completions, False


def _check_completions(completions: list, pair: bool):
    for c in completions:
        if not (c.strip() if isinstance(c, str) else any(m["content"].strip() for m in c)):
            raise RowError("empty or whitespace-only completion")
    for i, j in itertools.combinations(range(len(completions)), 2):
        if completions[i] == completions[j]:
            raise RowError("chosen and rejected are identical" if pair else f"completions {i} and {j} are identical")


def _human_scores(row: dict, cols: Columns, k: int) -> list[float]:
    scores = row_field(row, cols.human_scores)
    if (not isinstance(scores, list) or len(scores) != k
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in scores)):
        raise RowError(f"{cols.human_scores!r} must be a list of {k} finite numbers (one per completion); got {scores!r}")
    sign = -1.0 if cols.scores_order == "lower-better" else 1.0  # stored so that higher is better
    return [sign * float(v) for v in scores]


def _verdict(row: dict, cols: Columns) -> tuple[list[float] | None, float | None]:
    """The raters' verdict on a pair: (vote shares for the first candidate, or None; a given alpha, or None)."""
    if cols.votes:
        return [vote_codings.share(row_field(row, c), cols.vote_coding, c) for c in cols.votes], None
    a = row.get("alpha")
    if a is not None and a != "":  # an empty CSV cell is no alpha
        try:
            value = float(a) if isinstance(a, str) else a
        except ValueError:
            value = None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise RowError(f"'alpha' must be a number in [0, 1]; got {a!r}")
        return None, float(value)
    if row.get("votes") is not None:
        listed = row["votes"]
        if (not isinstance(listed, list) or not listed
                or any(isinstance(v, bool) or v not in (0, 0.5, 1) for v in listed)):
            raise RowError(f"'votes' must be a non-empty list of 1 (chosen), 0 (rejected) or 0.5 (tie); got {listed!r}")
        return [float(v) for v in listed], None
    return None, None


def _orient(example: Example, cols: Columns, shares: list[float] | None, alpha: float | None):
    """Set the pair's alpha from its votes (or a given alpha) and make the raters' choice the chosen
    completion: alpha < 0.5 swaps the two (unless keep_column_order). Swapping flips each vote
    (exact for 1, 0, 0.5, and for AlpacaEval's 2 - p), so the new alpha is computed from the flipped
    shares, not 1 - alpha rounded."""
    if shares is not None:
        alpha = sum(shares) / len(shares)
        # a probability is no count of votes (a `votes` list always is one)
        example.n_votes = None if cols.votes and cols.vote_coding in vote_codings.PROBABILITY else len(shares)
    if alpha is not None and alpha < 0.5 and not cols.keep_column_order:
        example.completions.reverse()
        example.reoriented = True
        alpha = 1.0 - alpha if shares is None else sum(1.0 - s for s in shares) / len(shares)
    example.alpha = alpha


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_unicode(value, what: str):
    """JSON can escape a lone surrogate (\\ud800), which is no Unicode text: no tokenizer or Parquet
    file takes it. Looks through nested messages without recursion (any depth)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if match := _SURROGATE.search(v):
                raise RowError(f"{what} holds a lone surrogate (\\u{ord(match.group()):04x}): not valid Unicode")
        elif isinstance(v, dict):
            stack += [*v.keys(), *v.values()]
        elif isinstance(v, list):
            stack += v


def parse_row(row: dict, cols: Columns) -> tuple:
    """(prompt, completions, whether the prompt was implicit, vote shares, given alpha) of one row,
    K-wise rows with their human scores in place of the shares; a RowError says why the row
    cannot be read. What the texts hold is checked apart (check_texts)."""
    if cols.id is not None:
        row_field(row, cols.id)  # a named id column must be there, and not null
    _check_unicode(row.get(cols.id or "id"), "the id")
    prompt, completions, implicit = _prompt_and_completions(row, cols)
    if cols.completions is not None:
        return prompt, completions, implicit, _human_scores(row, cols, len(completions)), None
    return (prompt, completions, implicit) + _verdict(row, cols)


def check_texts(prompt, completions, implicit, cols: Columns):
    """A RowError for texts that cannot be scored as read: a text join on message lists, lone
    surrogates, empty or identical completions."""
    if isinstance(prompt, list) and not implicit and cols.join not in (None, "chat"):
        raise RowError(f"the join {cols.join!r} puts text between a text prompt and its answers; this row's are "
                       f"message lists, which the chat template joins")
    _check_unicode(prompt, "the prompt")
    _check_unicode(completions, "a completion")
    _check_completions(completions, cols.completions is None)


def fill_example(example: Example, cols: Columns, prompt, completions, implicit, shares, alpha) -> Example:
    # the join applies to a text prompt from the row (message rows: the chat template; implicit: as given)
    example.join = cols.join if isinstance(prompt, str) and not implicit else None
    example.prompt, example.completions, example.implicit = prompt, list(completions), implicit
    example.multi_turn = any(isinstance(c, list) and len(c) > 1 for c in completions)
    if cols.completions is None:
        _orient(example, cols, shares, alpha)
    else:
        example.human_scores = shares
    return example


def row_id(index: int, row, cols: Columns) -> str:
    """The row's id, else its index (also for an id that is no valid Unicode: parse_row refuses it)."""
    row_id = row.get(cols.id or "id") if isinstance(row, dict) else None
    return str(index) if row_id is None or _SURROGATE.search(str(row_id)) else str(row_id)


def to_example(index: int, row, cols: Columns) -> Example:
    """Normalize one input row; every problem becomes `error`, never an exception."""
    if isinstance(row, BadRow):
        return Example(index, str(index), error=row.message)
    if not isinstance(row, dict):
        return Example(index, str(index), error=f"row is a JSON {json_kind(row)}, not an object")
    example = Example(index, row_id(index, row, cols))
    try:
        prompt, completions, implicit, shares, alpha = parse_row(row, cols)
        # filled before the texts are checked: a pair refused for its texts keeps its alpha, votes and tie
        fill_example(example, cols, prompt, completions, implicit, shares, alpha)
        check_texts(prompt, completions, implicit, cols)
    except RowError as e:
        example.error = str(e)
    return example


def check_columns(row: dict, cols: Columns):
    """Columns named for the whole input must exist in its first row: a typo is an invocation
    error, not a million row errors."""
    if cols.completions is None:
        named = (cols.prompt or []) + [cols.chosen, cols.rejected] + (cols.votes or [])
    else:
        named = (cols.prompt or []) + [cols.completions, cols.human_scores]
    named += ([cols.turn] if cols.turn else []) + [c for g in cols.group_by or [] for c in g.split("+")]
    named += [cols.id] if cols.id is not None else []
    if cols.join is not None and (cols.prompt == [] or cols.prompt is None and "prompt" not in row):
        raise InputError(f"<join> {cols.join!r} joins a prompt column to each answer, but the rows have none (the "
                         f"prompt is what the completions share)")
    missing = list(dict.fromkeys(c for c in named if c.partition(".")[0] not in row and c not in cols.optional))
    if not missing and cols.turn is not None and cols.completions is None:
        try:
            first = _messages_from_text(row[cols.chosen], cols.chosen) if cols.chosen in cols.messages else \
                row[cols.chosen]
        except RowError:
            first = None
        if not _is_messages(first):
            raise InputError(f"<turn> {cols.turn!r} cuts conversations, but the first row's {cols.chosen!r} is no "
                             f"message list: nothing would be cut")
    if missing:
        kwise = cols.completions is None and "completions" in row
        preset = formats.detect(row) if cols.format is None else None
        hint = (" (K completions per prompt? pass <completions>)" if kwise else
                f" (the first row looks like {preset}: column options alone turn off the format's detection; add "
                f"<format> {preset} to start from its mapping)" if preset else "")
        raise InputError(f"unknown column(s) {', '.join(map(repr, missing))}: the first row has "
                         f"{', '.join(map(repr, row)) or 'no fields'}{hint}")
