"""Seeded hostile inputs, a few hundred in all (tests/fuzz_cases.py): every one is either accepted
with the right numbers or refused with a one-line LowbitError; no tracebacks, hangs, memory
blow-ups, silently wrong results or lost files. `python -P bench/fuzz.py` runs more of them."""

import pytest

from tests.fuzz_cases import CATEGORIES, Workspace, run_category

N = {"lowbit.json": 120, "config.json": 80, "weight bytes": 40, "text files": 60, "arguments": 25, "outputs": 18,
     "gguf files": 40}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_no_input_breaks_lowbit(ws, category, capsys):
    tally = run_category(category, ws, N[category], seed=0)
    capsys.readouterr()
    assert tally.counts["tried"] == N[category]
    assert not tally.bad, "\n".join(f"{c}: {v}: {d}" for c, v, d in tally.bad[:10])
    assert tally.counts["clean"] > 0  # the generator does produce bad input
