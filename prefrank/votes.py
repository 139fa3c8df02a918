"""How a vote column reads: the vote codings, each cell → its share for the first candidate.

A counted coding names discrete votes (ties count half): alpha is the share of the pair's votes
for the chosen completion, and n_votes how many there were. A probability coding reads a judge's
or a reward model's soft preference as P(first better), the share itself: alpha is that
probability (the mean over the vote columns if there are several) and n_votes is null, since no
votes were counted. The analysis uses alpha as given either way (idealized ranking accuracy), and
says where it came from (`alpha_source`).

Any other counted coding is written out as a map, "VALUE=first,VALUE=second[,VALUE=tie]" (Auto-J:
0=first,1=second,2=tie): a cell is a vote when it is one of the values (numbers compared as numbers,
"2" and 2.0 reading as 2; other text compared after stripping spaces).
"""
import functools
import math

from prefrank.errors import RowError

# A counted vote's share for the first candidate column (chosen), by coding; ties count half.
COUNTED = {
    "1/2": {1: 1.0, 2: 0.0, 0: 0.5},  # PandaLM, LLMBar, AlpacaFarm: 1 = the first, 2 = the second, 0 = tie
    "0/1": {0: 1.0, 1: 0.0},  # PKU-SafeRLHF better_response_id: 0 = the first, 1 = the second
    "1/0": {1: 1.0, 0: 0.0},  # SHP labels, booleans: 1 (true) = the first, 0 (false) = the second
    "names": {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5},  # MT-Bench, Chatbot Arena winner
}
PROBABILITY = ("prob", "alpaca-eval")  # codings of a soft preference: alpha is a model's probability
CODINGS = (*COUNTED, *PROBABILITY)  # the named ones; an explicit map is a counted coding too (coding_map)
OUTCOMES = {"first": 1.0, "second": 0.0, "tie": 0.5}  # what a value of an explicit map says
HELP = {
    "1/2": "1 = the first candidate (the chosen column), 2 = the second (the rejected column), 0 = tie",
    "0/1": "0 = the first candidate, 1 = the second",
    "1/0": "1 or true = the first candidate, 0 or false = the second",
    "names": "model_a = the first candidate, model_b = the second, tie or 'tie (bothbad)' = tie",
    "prob": "P(the first candidate is better), a number in [0, 1] (0.5 = tie); alpha is that probability",
    "VALUE=first,VALUE=second[,VALUE=tie]": "any other coding, written out (Auto-J: 0=first,1=second,2=tie)",
    "alpaca-eval": "AlpacaEval's preference, 1 + P(the second candidate is better), a number in [1, 2] (1.5, "
                   "and the legacy 0, = tie; its 1/2 annotators' votes read as probabilities 1 and 0); alpha is "
                   "the probability",
}


def _number(value) -> float | int | None:
    """The number a cell holds (CSV cells are text: the number they spell), else None; a bool is
    no number here."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    return None if isinstance(value, bool) or not isinstance(value, (int, float)) else value


def whole_number(value) -> int | None:
    """The integer a cell holds: an int, an integral float, or the text of one; else None."""
    number = _number(value)
    if number is None or (isinstance(number, float) and not number.is_integer()):
        return None
    return int(number)


def _map_key(value):
    """How a cell (or a map's value) is looked up in an explicit map: the whole number it spells, else
    its text stripped (a bool as true / false)."""
    if isinstance(value, bool):
        return str(value).lower()
    number = whole_number(value)
    return number if number is not None else str(value).strip()


@functools.lru_cache(maxsize=16)
def coding_map(coding: str) -> dict:
    """{value: share for the first candidate} of a counted coding, named or an explicit map
    "VALUE=first,VALUE=second[,VALUE=tie]"; ValueError says why `coding` is neither."""
    if coding in COUNTED:
        return COUNTED[coding]
    if coding in PROBABILITY or "=" not in coding:
        raise ValueError(f"vote coding {coding!r}: expected one of {', '.join(CODINGS)}, or a map such as "
                         f"0=first,1=second,2=tie")
    shares = {}
    for item in coding.split(","):
        value, _, outcome = (part.strip() for part in item.partition("="))
        if not value or outcome.lower() not in OUTCOMES:
            raise ValueError(f"vote coding {coding!r}: {item.strip()!r} is not VALUE=first, VALUE=second or "
                             f"VALUE=tie")
        key = _map_key(value)
        if key in shares:
            raise ValueError(f"vote coding {coding!r}: {value!r} is mapped twice")
        shares[key] = OUTCOMES[outcome.lower()]
    if not {1.0, 0.0} <= set(shares.values()):
        raise ValueError(f"vote coding {coding!r}: a map needs a value for first and one for second")
    return shares


def _probability(value, coding: str) -> float | None:
    """P(first better) that a probability coding's cell says, or None if it says none (out of
    range, not finite, not a number)."""
    p = _number(value)
    if p is None or not math.isfinite(p):
        return None
    if coding == "prob":
        return float(p) if 0 <= p <= 1 else None
    if p == 0:  # AlpacaEval's legacy draw (its own code reads 0 as 1.5)
        return 0.5
    return 2.0 - p if 1 <= p <= 2 else None  # exact: 2 - p needs no rounding for p in [1, 2]


def _counted(value, coding: str) -> float | None:
    """A counted coding's share for the first candidate, or None if `value` is no vote in it.
    Numeric codings read the number a text cell spells ("2", "2.0"), and 0/1, 1/0 also "true" /
    "false" (a bool is a vote in those two only)."""
    if coding not in COUNTED:  # an explicit map
        return coding_map(coding).get(_map_key(value)) if isinstance(value, (str, int, float)) else None
    shares, key = COUNTED[coding], value
    if coding != "names":
        if isinstance(key, str):
            key = {"true": True, "false": False}.get(key.strip().lower(), key)
        key = (None if coding == "1/2" else int(key)) if isinstance(key, bool) else whole_number(key)
    if not isinstance(key, (int, str)) or isinstance(key, bool):
        return None
    return shares.get(key)


def share(value, coding: str, column: str) -> float:
    """One cell's share for the first candidate (a RowError naming the value if it is none)."""
    result = _probability(value, coding) if coding in PROBABILITY else _counted(value, coding)
    if result is None:
        meaning = HELP.get(coding, "the values of the map")
        raise RowError(f"{column!r}: {value!r} is not a vote in the {coding} coding ({meaning})")
    return result


def alpha_source(columns: dict) -> str:
    """Where alpha comes from under a column mapping (a Columns' fields, as a sidecar records them)."""
    votes, coding = columns.get("votes"), columns.get("vote_coding")
    if votes and coding in PROBABILITY:
        return (f"a model's probability, not human votes: column(s) {', '.join(votes)} in the {coding} coding "
                f"(n_votes is null)")
    if votes:
        return f"rater votes: column(s) {', '.join(votes)} in the {coding} coding"
    return "the input's alpha column or votes list, where present"
