"""Best-value tracking and early stopping on scripted validation curves (the trainer's selection rules)."""

import math

import pytest

from dinocell.train.early_stopping import EarlyStopping


def _run(curve: list[float], metric: str = "val_loss", **kwargs) -> tuple[EarlyStopping, list[bool], int | None]:
    """Feed `curve` (one value per validation, at iterations 10, 20, ...) until the tracker says stop."""
    es = EarlyStopping(metric, **kwargs)
    new_best, stopped_at = [], None
    for i, value in enumerate(curve):
        new_best.append(es.update(value, 10 * (i + 1)))
        if es.should_stop:
            stopped_at = 10 * (i + 1)
            break
    return es, new_best, stopped_at


def test_lower_loss_is_better_and_patience_counts_validations_without_improvement():
    es, new_best, stopped = _run([5.0, 4.0, 4.5, 3.0, 3.5, 3.2, 3.1, 2.0], patience=3, min_delta=0.0)
    assert new_best == [True, True, False, True, False, False, False]
    assert stopped == 70 and es.best == 3.0 and es.best_iteration == 40  # 3.5, 3.2, 3.1: three without improvement
    assert es.summary() == "val_loss did not improve by more than 0 for 3 validations; best 3.0000 at iteration 40 " \
        "(ckpt/best)"


def test_higher_knn_is_better():
    es, new_best, stopped = _run([40.0, 55.0, 55.0, 50.0], metric="knn_top1", patience=2, min_delta=0.0)
    assert new_best == [True, True, False, False] and stopped == 40  # a tie is no improvement: the older one stays
    assert es.best == 55.0 and es.best_iteration == 20


def test_min_delta_resets_only_on_a_real_gain_but_a_small_gain_is_still_the_best_checkpoint():
    # reference 1.0; 0.97 and 0.94 beat the best (new best checkpoints) but not the reference by more than 0.05;
    # 0.94 vs the reference 1.0 is a gain of 0.06 > 0.05: the count resets and 0.94 becomes the reference
    es, new_best, stopped = _run([1.0, 0.97, 0.94, 0.93, 0.92, 0.91], patience=3, min_delta=0.05)
    assert new_best == [True] * 6 and stopped == 60  # 0.93, 0.92, 0.91: within 0.05 of the reference 0.94
    assert es.reference == 0.94 and es.best == 0.91 and es.best_iteration == 60
    es, _, stopped = _run([1.0, 0.97, 0.96, 0.99], patience=3, min_delta=0.05)
    assert stopped == 40 and es.best == 0.96 and es.best_iteration == 30


def test_patience_zero_never_stops_and_nan_is_never_best():
    es, new_best, stopped = _run([3.0, math.nan, 4.0, 5.0, 6.0, 7.0], patience=0, min_delta=0.0)
    assert stopped is None and new_best == [True, False, False, False, False, False] and es.bad_validations == 5
    es, new_best, _ = _run([math.nan, 2.0], patience=5, min_delta=0.0)
    assert new_best == [False, True] and es.best == 2.0
    es, _, stopped = _run([math.nan, math.nan], patience=2, min_delta=0.0)
    assert stopped == 20 and es.summary() == "val_loss did not improve by more than 0 for 2 validations; no finite " \
        "value, so no best checkpoint"


def test_state_round_trip_continues_exactly():
    curve = [5.0, 4.0, 4.2, 3.8, 3.9, 4.0, 4.0]
    straight, _, stopped = _run(curve, patience=2, min_delta=0.15)
    first = EarlyStopping("val_loss", patience=2, min_delta=0.15)
    for i, value in enumerate(curve[:3]):
        first.update(value, 10 * (i + 1))
    resumed = EarlyStopping("val_loss", patience=2, min_delta=0.15)
    resumed.load_state_dict(first.state_dict())
    for i, value in enumerate(curve[3:], start=3):
        resumed.update(value, 10 * (i + 1))
        if resumed.should_stop:
            break
    assert stopped == 10 * (i + 1) == 60 and resumed.state_dict() == straight.state_dict()
    assert straight.best == 3.8 and straight.best_iteration == 40


def test_a_checkpoint_that_tracked_another_metric_starts_afresh():
    knn = EarlyStopping("knn_top1", patience=2, min_delta=0.0)
    knn.update(60.0, 10)
    loss = EarlyStopping("val_loss", patience=2, min_delta=0.0)
    loss.load_state_dict(knn.state_dict())
    assert loss.best is None and loss.update(3.0, 20)
    with pytest.raises(ValueError, match="unknown metric 'val_acc'; expected one of val_loss, knn_top1"):
        EarlyStopping("val_acc", patience=1, min_delta=0.0)
