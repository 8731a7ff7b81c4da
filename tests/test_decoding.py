"""The shared greedy loop (`engines/decoding.py`) on a scripted step decoder: the rules it applies and the calls
it makes, independently of any model (each engine's own tests check its output against transformers')."""

from __future__ import annotations

import numpy as np

from whisper_ptq.engines.decoding import DecodingRules, greedy_choice, greedy_decode

EOS = 9
RULES = DecodingRules(prompt=(7, 8), suppress=(3,), begin_suppress=(5, EOS), eos=EOS, max_length=8)


class ScriptedState:
    """Row r's logits favour `wanted[r][k]` at its k-th generated token, but token 3 (always suppressed) and, at
    the first generated token, token 5 (begin-suppressed) score higher; records every call."""

    def __init__(self, wanted: list[list[int]]):
        self.wanted, self.rows, self.calls = wanted, list(range(len(wanted))), []

    def step(self, tokens: np.ndarray, start: int, suppress: np.ndarray) -> np.ndarray:
        self.calls.append(("step", tokens.tolist(), start, sorted(suppress.tolist())))
        generated = start + tokens.shape[1] - len(RULES.prompt)
        logits = np.zeros((len(self.rows), 10), np.float32)
        for i, row in enumerate(self.rows):
            logits[i, self.wanted[row][generated]] = 1.0
            logits[i, 3] = 2.0
            if generated == 0:
                logits[i, 5] = 2.0
        return greedy_choice(logits, suppress)

    def keep(self, rows: list[int]) -> None:
        self.calls.append(("keep", rows))
        self.rows = [self.rows[i] for i in rows]


def test_rules_ragged_batch_and_padding() -> None:
    state = ScriptedState([[1, EOS, 0, 0, 0, 0], [2, 4, 6, EOS, 0, 0]])
    ids = greedy_decode(state, 2, RULES)
    assert ids.tolist() == [[7, 8, 1, EOS, EOS, EOS], [7, 8, 2, 4, 6, EOS]]
    first, *later = [c for c in state.calls if c[0] == "step"]
    assert first == ("step", [[7, 8], [7, 8]], 0, [3, 5, EOS])  # the prompt, begin-suppress at the first step
    assert all(call[3] == [3] for call in later)
    assert ("keep", [1]) in state.calls and later[1] == ("step", [[4]], 3, [3])  # row 0 left at its eos


def test_max_length_stops_a_row_that_never_ends() -> None:
    state = ScriptedState([[1] * 8])
    ids = greedy_decode(state, 1, RULES)
    assert ids.shape == (1, RULES.max_length) and ids[0, 2:].tolist() == [1] * 6
