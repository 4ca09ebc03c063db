"""The interval economics against hand-computed values (no training, no torch)."""

import math

import pytest

from open_instruct_ckpt._measure.advisor import (
    Costs,
    advise,
    interval_cost,
    kept_checkpoints,
    optimal_interval,
    optimal_steps,
    summary,
    table,
    young_daly_seconds,
)

# A 24 h MTBF, 30 s saves, 2 s steps, 10,000 steps.
MTBF = Costs(save_seconds=30.0, step_seconds=2.0, mtbf_hours=24.0, total_steps=10_000)


def test_mtbf_optimum_is_young_daly():
    # N* s = sqrt(2 C MTBF) = sqrt(2 * 30 * 86400) = 2276.84 s, i.e. 1138.42 steps of 2 s
    assert young_daly_seconds(30.0, 24.0) == pytest.approx(2276.840, abs=1e-3)
    assert optimal_interval(MTBF) == pytest.approx(1138.420, abs=1e-3)
    assert optimal_steps(MTBF) == 1138
    # and it does not depend on the run's length
    assert optimal_interval(Costs(30.0, 2.0, mtbf_hours=24.0)) == pytest.approx(1138.420, abs=1e-3)


def test_costs_at_an_interval_by_hand():
    cost = interval_cost(MTBF, 500)
    # overhead (T / N) C = 20 saves * 30 s = 600 s, 3% of 20,000 s of compute
    assert cost.overhead_seconds == pytest.approx(600.0)
    assert cost.overhead_fraction == pytest.approx(0.03)
    # expected failures F = T s / MTBF = 20,000 / 86,400; loss F (N / 2) s = 0.231481 * 250 * 2 = 115.74 s
    assert cost.lost_seconds == pytest.approx(20_000 / 86_400 * 250 * 2)
    assert cost.lost_seconds == pytest.approx(115.7407, abs=1e-4)
    assert cost.seconds == 1000.0


def test_failure_probability_optimum_balances_overhead_and_loss():
    # N* = sqrt(2 T C / (P s)) = sqrt(2 * 1000 * 10 / (0.5 * 1)) = 200
    costs = Costs(save_seconds=10.0, step_seconds=1.0, failure_probability=0.5, total_steps=1000)
    assert optimal_interval(costs) == pytest.approx(200.0)
    best = interval_cost(costs, 200)
    assert best.overhead_seconds == pytest.approx(50.0)  # 5 saves of 10 s
    assert best.lost_seconds == pytest.approx(50.0)  # 0.5 * 100 steps * 1 s
    neighbours = [interval_cost(costs, n).total_fraction for n in (150, 199, 201, 260)]
    assert all(best.total_fraction < other for other in neighbours)


def test_disk_use_follows_retention():
    costs = Costs(10.0, 1.0, failure_probability=0.5, total_steps=1000, checkpoint_bytes=2_000, keep_last=3)
    assert kept_checkpoints(200, 1000, 3) == 3
    assert kept_checkpoints(200, 1000, None) == 5
    assert kept_checkpoints(300, 1000, None) == 4  # ceil(1000 / 300)
    assert kept_checkpoints(200, None, None) is None
    assert interval_cost(costs, 200).disk_bytes == 6_000
    assert interval_cost(costs, 500).disk_bytes == 4_000  # only 2 written


def test_bounds_of_the_rounded_optimum():
    assert optimal_steps(Costs(0.0, 1.0, mtbf_hours=24.0)) == 1  # free saves: every step
    capped = Costs(1e6, 1.0, failure_probability=0.01, total_steps=50)
    assert optimal_steps(capped) == 50
    assert "optimal interval: 50 steps (50.0 s) (capped at the run's length)" in summary(advise(capped))
    assert "capped" not in summary(advise(MTBF))


def test_advice_table_marks_optimum_and_current():
    advice = advise(MTBF, current_steps=500)
    assert advice.optimal.steps == 1138 and advice.current.steps == 500
    assert [row.steps for row in advice.table] == [284, 500, 569, 1138, 2276, 4552]
    text = table(advice)
    assert " 1138 " in text and text.count("optimal") == 1 and text.count("current") == 1
    assert "optimal interval: 1138 steps (37.9 min)" in summary(advice)
    assert math.isclose(advice.to_dict()["optimal"]["steps"], 1138)


@pytest.mark.parametrize("costs,match", [
    (Costs(1.0, 0.0, mtbf_hours=1.0), r"step seconds 0.0 must be a positive number"),
    (Costs(-1.0, 1.0, mtbf_hours=1.0), r"save seconds -1.0 must be a number of seconds >= 0"),
    (Costs(1.0, 1.0), r"give exactly one of the mean time between failures"),
    (Costs(1.0, 1.0, mtbf_hours=1.0, failure_probability=0.1, total_steps=5), r"give exactly one of"),
    (Costs(1.0, 1.0, failure_probability=1.5, total_steps=5), r"failure probability 1.5 must be in \(0, 1\]"),
    (Costs(1.0, 1.0, failure_probability=0.5), r"a failure probability is per run: give the run's total steps"),
    (Costs(1.0, 1.0, mtbf_hours=-2.0), r"mtbf_hours=-2.0 must be a positive number of hours"),
])
def test_unusable_costs_name_the_value(costs, match):
    with pytest.raises(ValueError, match=match):
        optimal_interval(costs)


@pytest.mark.parametrize("costs,current,field,match", [
    (MTBF, 0, "current_interval", r"current interval 0 must be a whole number >= 1"),
    (MTBF, -5, "current_interval", r"current interval -5 must be a whole number >= 1"),
    (MTBF, "500", "current_interval", r"current interval '500' must be a whole number"),
    (Costs(30.0, 2.0, mtbf_hours=24.0, keep_last=-3), None, "keep_last", r"keep last -3 must be a whole number >= 1"),
    (Costs(30.0, 2.0, mtbf_hours=24.0, keep_last="3"), None, "keep_last", r"keep last '3' must be a whole number"),
    (Costs(30.0, 2.0, mtbf_hours=24.0, checkpoint_bytes=-1000), None, "checkpoint_bytes",
     r"checkpoint bytes -1000 must be a whole number >= 0"),
    (Costs(30.0, 2.0, mtbf_hours=24.0, checkpoint_bytes="many"), None, "checkpoint_bytes", r"checkpoint bytes 'many'"),
    (Costs(30.0, True, mtbf_hours=24.0), None, "step_seconds", r"step seconds True must be a positive number"),
    (Costs(float("nan"), 2.0, mtbf_hours=24.0), None, "save_seconds", r"save seconds nan must be a number"),
    (Costs(1e308, 2.0, mtbf_hours=24.0), None, None, r"overflow.*save seconds 1e\+308.*give the seconds, hours"),
    (Costs(30.0, 1e-200, mtbf_hours=24.0), None, None, r"overflow.*step seconds 1e-200"),
    (Costs(30.0, 2.0, mtbf_hours=1e307), None, None, r"overflow.*mtbf hours 1e\+307"),
    (Costs(30.0, 2.0, failure_probability=0.5, total_steps=10**400), None, None, r"overflow.*total steps 1000"),
    (Costs(30.0, 2.0, mtbf_hours=24.0, total_steps=100, checkpoint_bytes=10**400), None, None,
     r"overflow.*checkpoint bytes 1000"),
])
def test_every_input_is_checked_and_every_result_is_finite(costs, current, field, match):
    with pytest.raises(ValueError, match=match) as raised:
        advise(costs, current)
    assert getattr(raised.value, "field", "no field") == field  # the CLI names the option that overrides it
