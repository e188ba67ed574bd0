"""The UVA gather's grid rule (offload/grid.py): a bound on SMs, chosen by the joined step.
The measurement itself runs in the gpu tests (tests/test_gpu_rows.py)."""

from offload.grid import candidates, max_programs, pick


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
