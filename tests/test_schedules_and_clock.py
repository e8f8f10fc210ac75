import pytest

from livecache.accel.deepcache import DeepCacheConfig
from livecache.accel.schedules import count_full, format_schedule, nonuniform_schedule, uniform_schedule
from livecache.accel.step_clock import StepClock


def test_uniform_schedule_full_every_interval():
    assert format_schedule(uniform_schedule(10, 3)) == "F..F..F..F"
    assert format_schedule(uniform_schedule(5, 1)) == "FFFFF"


def test_uniform_window_keeps_edges_full():
    assert format_schedule(uniform_schedule(10, 3, start=0.2, end=0.8)) == "FFF..F..FF"


@pytest.mark.parametrize("total,interval", [(20, 2), (20, 3), (20, 5), (7, 3), (50, 4), (4, 4)])
def test_nonuniform_same_budget_and_first_step_full(total, interval):
    uniform = uniform_schedule(total, interval)
    for center in (0.0, 0.3, 0.7):
        schedule = nonuniform_schedule(total, interval, center=center)
        assert len(schedule) == total
        assert schedule[0]
        assert count_full(schedule) == count_full(uniform)


def test_nonuniform_is_denser_near_center():
    schedule = nonuniform_schedule(20, 3, center=0.0, power=1.4)
    assert count_full(schedule[:10]) > count_full(schedule[10:])


@pytest.mark.parametrize("kwargs", [
    {"cache_interval": 0}, {"cache_branch_id": -1}, {"schedule": "random"}, {"start": 0.5, "end": 0.4},
    {"power": 0.5, "schedule": "non-uniform"}, {"center": 1.5, "schedule": "non-uniform"},
])
def test_bad_config_is_refused_with_a_message(kwargs):
    with pytest.raises(ValueError) as err:
        DeepCacheConfig(**kwargs)
    assert str(err.value)


def test_clock_counts_steps_slots_and_new_generations():
    clock = StepClock()
    clock.begin(3)
    ticks = [clock.tick(level) for level in (999, 999, 500, 500, 1)]
    assert [(t.step, t.slot) for t in ticks] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    again = clock.tick(999)  # back to high noise: a new generation even without begin()
    assert (again.step, again.slot) == (0, 0)
