"""Label subsets: class-balanced, at least one image per class, stable for a seed, nested; the
validation split keeps a single-image class in train."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linear_probe.errors import EvaluationError
from linear_probe.splits import LabelBudget, parse_label_budgets, sample_label_subset, stratified_split


def imbalanced_labels() -> np.ndarray:
    return np.repeat(np.arange(4), [500, 100, 30, 1])


def test_fractions_follow_each_class_with_at_least_one_image():
    labels = imbalanced_labels()
    chosen = sample_label_subset(labels, LabelBudget(fraction=0.1), seed=0)
    counts = np.bincount(labels[chosen], minlength=4)
    assert counts.tolist() == [50, 10, 3, 1]
    one_percent = np.bincount(labels[sample_label_subset(labels, LabelBudget(fraction=0.01), seed=0)], minlength=4)
    assert one_percent.tolist() == [5, 1, 1, 1]


def test_per_class_budget_is_balanced():
    labels = imbalanced_labels()
    counts = np.bincount(labels[sample_label_subset(labels, LabelBudget(per_class=5), seed=3)], minlength=4)
    assert counts.tolist() == [5, 5, 5, 1]


def test_subsets_are_stable_for_a_seed_different_across_seeds_and_nested():
    labels = np.repeat(np.arange(10), 100)
    first = sample_label_subset(labels, LabelBudget(fraction=0.05), seed=7)
    assert np.array_equal(first, sample_label_subset(labels, LabelBudget(fraction=0.05), seed=7))
    assert not np.array_equal(first, sample_label_subset(labels, LabelBudget(fraction=0.05), seed=8))
    larger = sample_label_subset(labels, LabelBudget(fraction=0.2), seed=7)
    assert set(first) <= set(larger)


def test_one_class_draw_does_not_depend_on_another_class():
    labels = np.repeat(np.arange(3), 50)
    chosen = sample_label_subset(labels, LabelBudget(per_class=4), seed=0)
    grown = np.concatenate([labels, np.full(20, 2)])  # class 2 gains images at the end
    chosen_grown = sample_label_subset(grown, LabelBudget(per_class=4), seed=0)
    assert np.array_equal(chosen[labels[chosen] < 2], chosen_grown[grown[chosen_grown] < 2])


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(1, 60), min_size=1, max_size=8), fraction=st.floats(0.001, 1.0),
       seed=st.integers(0, 1000))
def test_any_fraction_keeps_every_class_and_no_duplicates(counts, fraction, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    chosen = sample_label_subset(labels, LabelBudget(fraction=fraction), seed)
    assert len(np.unique(chosen)) == len(chosen)
    assert set(labels[chosen]) == set(range(len(counts)))
    assert len(chosen) <= len(labels)


def test_stratified_split_holds_out_each_class_and_keeps_singletons(caplog):
    labels = imbalanced_labels()
    with caplog.at_level(logging.WARNING):
        kept, held_out = stratified_split(labels, 0.1, seed=0)
    assert np.intersect1d(kept, held_out).size == 0 and len(kept) + len(held_out) == len(labels)
    assert np.bincount(labels[held_out], minlength=4).tolist() == [50, 10, 3, 0]
    assert 3 in labels[kept]  # the single image of class 3 stays in train
    assert "single image" in caplog.text


def test_parse_label_budgets():
    assert parse_label_budgets("0.01, 0.1,1.0,5pc") == (
        LabelBudget(fraction=0.01), LabelBudget(fraction=0.1), LabelBudget(fraction=1.0), LabelBudget(per_class=5))
    assert [budget.label for budget in parse_label_budgets("0.01,1,10pc")] == ["1%", "100%", "10/class"]
    for bad in ("0", "1.5", "abc", "0pc", ""):
        with pytest.raises(EvaluationError):
            parse_label_budgets(bad)
