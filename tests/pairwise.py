"""A pairwise covering array: rows of option values in which every allowed pair of values of two options appears.

Greedy, deterministic (AETG-style): each new row is the best of a few candidates, built one option at a time by
picking the value that covers the most pairs not yet covered, and checked against the constraints.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

Row = dict[str, object]


def _pairs(row: Row, names: list[str]) -> set[tuple]:
    return {(a, row[a], b, row[b]) for a, b in itertools.combinations(names, 2) if a in row and b in row}


def _allowed_pairs(factors: dict[str, list], allowed: Callable[[Row], bool]) -> set[tuple]:
    """Pairs that at least one full allowed row contains (constraints can exclude a pair entirely)."""
    names = list(factors)
    found: set[tuple] = set()
    for values in itertools.product(*factors.values()):
        row = dict(zip(names, values))
        if allowed(row):
            found |= _pairs(row, names)
    return found


def covering_rows(factors: dict[str, list], allowed: Callable[[Row], bool], seed: int = 0,
                  candidates: int = 30) -> list[Row]:
    names = list(factors)
    uncovered = _allowed_pairs(factors, allowed)
    rng = random.Random(seed)
    rows: list[Row] = []
    while uncovered:
        best = max((_candidate(factors, names, uncovered, allowed, rng) for _ in range(candidates)),
                   key=lambda row: len(_pairs(row, names) & uncovered) if row else -1)
        if not best or not _pairs(best, names) & uncovered:
            raise AssertionError(f"no allowed row covers {sorted(uncovered)[:3]}")
        rows.append(best)
        uncovered -= _pairs(best, names)
    return rows


def _candidate(factors, names, uncovered, allowed, rng) -> Row | None:
    order = names[:]
    rng.shuffle(order)
    row: Row = {}
    for name in order:
        options = factors[name][:]
        rng.shuffle(options)
        scored = []
        for value in options:
            trial = {**row, name: value}
            if _completable(trial, factors, allowed):
                scored.append((len(_pairs(trial, names) & uncovered), value))
        if not scored:
            return None
        row[name] = max(scored, key=lambda item: item[0])[1]
    return {name: row[name] for name in names}


def _completable(partial: Row, factors: dict[str, list], allowed: Callable[[Row], bool]) -> bool:
    free = [name for name in factors if name not in partial]
    return any(allowed({**partial, **dict(zip(free, values))}) for values in itertools.product(*(factors[n] for n in free)))


def uncovered_pairs(rows: list[Row], factors: dict[str, list], allowed: Callable[[Row], bool]) -> set[tuple]:
    names = list(factors)
    covered = set().union(*(_pairs(row, names) for row in rows)) if rows else set()
    return _allowed_pairs(factors, allowed) - covered
