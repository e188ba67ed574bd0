"""The UVA gather's grid rule (offload/grid.py): a bound on SMs, chosen by the joined step.
The measurement runs against a model of a GPU here, on CUDA in tests/test_gpu_rows.py."""

import pytest

from offload.grid import MAX_UNITS, TIE, candidates, max_programs, measure, pick, stand_in_units


def test_the_gather_may_hold_at_most_half_the_sms():
    assert max_programs(132) == 66 and max_programs(1) == 1
    assert candidates(132) == (16, 33, 66)  # H100 SXM
    assert candidates(4) == (1, 2)
    assert max(candidates(132, share=0.25)) == 33


def test_the_fastest_joined_step_wins_and_fewer_programs_win_a_tie():
    assert pick({16: 3.0e-3, 33: 2.0e-3, 66: 2.5e-3})[0] == 33
    chosen, why = pick({16: 2.03e-3, 33: 2.0e-3, 66: 2.6e-3})
    assert chosen == 16 and "fewer programs" in why and "33 programs" in why
    chosen, why = pick({16: 2.0e-3, 33: 2.0e-3})
    assert chosen == 16 and why.startswith("fastest step beside compute")


class ModelGpu:
    """A GPU of ``sms`` SMs as the grid measurement sees it: the gather alone is bound by its
    programs until the link saturates (at 33 programs here); compute uses every SM and runs
    slower by the share of SMs the gather's programs hold while both run."""

    sms, unit_s, link_s, per_program_s = 132, 1e-4, 2.6e-3, 33 * 2.6e-3

    def alone(self, p: int) -> float:
        return max(self.link_s, self.per_program_s / p)

    def joined(self, p: int, n: int) -> float:
        gather, compute = self.alone(p), n * self.unit_s
        share = (self.sms - p) / self.sms  # compute's speed while the gather runs
        if compute / share <= gather:
            return gather
        return gather + compute - gather * share


def _measure(gpu: ModelGpu, compute_s=None):
    grids = candidates(gpu.sms)
    return measure(
        grids, gpu.alone, lambda: gpu.unit_s, lambda n: n * gpu.unit_s, gpu.joined, 3, compute_s
    )


def test_the_stand_in_lasts_as_long_as_the_fastest_gather_so_the_grids_differ():
    gpu = ModelGpu()
    alone, stand_in_s, step = _measure(gpu)
    assert alone == {16: pytest.approx(5.3625e-3), 33: 2.6e-3, 66: 2.6e-3}
    assert stand_in_s == pytest.approx(2.6e-3)  # the fastest gather, not the slowest
    assert pick(step)[0] == 33  # saturates the link without holding more SMs than that needs
    assert step[16] > 1.5 * step[33] and step[66] > (1 + TIE) * step[33]
    # sized to the slowest gather (the old rule) every gather hides under compute: a tie that
    # the fewest programs win, the slowest gather of the three
    n = stand_in_units(alone, gpu.unit_s, max(alone.values()))
    old = {p: gpu.joined(p, n) for p in alone}
    assert old[16] < (1 + TIE) * old[33] and pick(old)[0] == 16


def test_the_steps_own_compute_sizes_the_stand_in_when_known():
    gpu = ModelGpu()
    assert stand_in_units({16: 1.0}, 1e-4, 5e-3) == 50
    assert stand_in_units({16: 1e-3, 33: 5e-4}, 1e-4, None) == 5
    assert stand_in_units({16: 1.0}, 0.0, None) == MAX_UNITS
    _, stand_in_s, step = _measure(gpu, compute_s=20e-3)  # a long step hides any gather:
    assert stand_in_s == pytest.approx(20e-3)
    assert pick(step)[0] == 16  # the fewest programs slow compute least
