"""Stochastic Quantization selection: probabilities, roulette draws, schedule, state.

``select(error, ratio)`` draws ``round(ratio * m)`` rows to quantize without
replacement, row ``i`` with probability ``p_i = f(1/(e_i+eps)) / sum_j f(...)``.
The statistical tests compare empirical frequencies over N draws with the exact
probabilities, within 5 standard errors ``sqrt(p(1-p)/N)``.
"""
import io
import itertools
import math

import pytest
import torch

from sqdist import SQConfig, SQSelector, select, selection_probability
from sqdist.sq import EPS

N_DRAWS = 4000
ERRORS = torch.tensor([0.05, 0.1, 0.2, 0.4, 0.8])  # x = 1/e = 20, 10, 5, 2.5, 1.25


def frequencies(error, ratio, n=N_DRAWS, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return sum(select(error, ratio, generator=g, **kw).double() for _ in range(n)) / n


def assert_frequencies_match(freq, p, n=N_DRAWS):
    p = torch.as_tensor(p, dtype=torch.float64)
    tol = 5 * torch.sqrt(p * (1 - p) / n) + 1e-9
    assert ((freq - p).abs() <= tol).all(), f"empirical {freq.tolist()} vs exact {p.tolist()} (tol {tol.tolist()})"


def inclusion_probabilities(p, k) -> torch.Tensor:
    """Exact P(row i among k draws without replacement), by enumerating the ordered draws."""
    p = [float(v) for v in p]
    incl = [0.0] * len(p)
    for order in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for i in order:  # each draw: p_i renormalized over the rows not drawn yet
            prob *= p[i] / left
            left -= p[i]
        for i in order:
            incl[i] += prob
    return torch.tensor(incl, dtype=torch.float64)


# ------------------------------------------------------------ probability rules
def test_probability_rules_match_their_formulas():
    x = 1.0 / (ERRORS.double() + EPS)
    torch.testing.assert_close(selection_probability(ERRORS, "constant"), torch.full((5,), 0.2, dtype=torch.float64))
    torch.testing.assert_close(selection_probability(ERRORS, "linear"), x / x.sum())
    s = 1 / (1 + torch.exp(-x))
    torch.testing.assert_close(selection_probability(ERRORS, "sigmoid"), s / s.sum())
    torch.testing.assert_close(selection_probability(ERRORS, "softmax"), torch.exp(x) / torch.exp(x).sum())
    # the linear rule by hand: x = 20, 10, 5, 2.5, 1.25, sum 38.75
    torch.testing.assert_close(selection_probability(ERRORS, "linear"),
                               torch.tensor([20, 10, 5, 2.5, 1.25], dtype=torch.float64) / 38.75, rtol=1e-5, atol=0)


def test_unknown_probability_rule_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"sq.probability='cubic'; allowed: constant, linear, sigmoid, softmax"):
        selection_probability(ERRORS, "cubic")


# ------------------------------------------------------------ draws
@pytest.mark.parametrize("m, ratio", [(1, 0.5), (5, 0.5), (7, 0.3), (64, 0.875), (10, 0.0), (10, 1.0)])
def test_exact_number_of_rows_selected(m, ratio, generator):
    mask = select(torch.rand(m), ratio, generator=generator)
    assert mask.dtype == torch.bool and mask.shape == (m,)
    assert int(mask.sum()) == round(ratio * m)


@pytest.mark.parametrize("rule", ["constant", "linear", "sigmoid", "softmax"])
def test_one_draw_frequencies_match_p(rule):
    # ratio 0.2 of 5 rows = one row per draw, picked with probability p_i
    freq = frequencies(ERRORS, 0.2, rule=rule)
    assert_frequencies_match(freq, selection_probability(ERRORS, rule))


def test_low_error_row_is_quantized_more_often():
    freq = frequencies(ERRORS, 0.2)
    assert freq[0] > freq[1] > freq[2] > freq[3]
    assert freq[0] > 5 * freq[4]  # p = 0.516 vs 0.032


@pytest.mark.parametrize("ratio", [0.4, 0.6])  # 2 and 3 rows of 5
def test_several_draws_match_exact_inclusion_probabilities(ratio):
    k = round(ratio * 5)
    exact = inclusion_probabilities(selection_probability(ERRORS, "linear"), k)
    assert exact.sum().item() == pytest.approx(k)
    assert_frequencies_match(frequencies(ERRORS, ratio), exact)


def test_constant_rule_is_uniform():
    assert_frequencies_match(frequencies(ERRORS, 0.4, rule="constant"), torch.full((5,), 0.4))


@pytest.mark.parametrize("ratio", [0.8, 0.6])  # 1 and 2 rows of 5 stay full precision
def test_authors_variant_draws_full_precision_rows_by_error(ratio):
    n_fp = 5 - round(ratio * 5)
    p_fp = (ERRORS.double() + EPS) / (ERRORS.double() + EPS).sum()
    freq_quantized = frequencies(ERRORS, ratio, variant="authors")
    assert_frequencies_match(1 - freq_quantized, inclusion_probabilities(p_fp, n_fp))
    # the high-error row is the one most often left full precision
    assert freq_quantized[4] < freq_quantized[0]


def test_zero_error_rows_and_softmax_underflow_still_draw_at_random(generator):
    # softmax of x = 1/e puts all mass on the exact row; the second pick must still be random
    error = torch.tensor([0.0, 0.3, 0.3, 0.3])
    masks = torch.stack([select(error, 0.5, rule="softmax", generator=generator) for _ in range(600)]).double()
    assert masks[:, 0].all()
    assert_frequencies_match(masks[:, 1:].mean(0), torch.full((3,), 1 / 3), n=600)


def test_element_granularity_counts_elements(generator):
    error = torch.rand(6, 9)  # (m, n) element errors
    mask = select(error, 0.75, generator=generator)
    assert mask.shape == (6, 9)
    assert int(mask.sum()) == round(0.75 * 54)


# ------------------------------------------------------------ selector: schedule and state
def test_masks_change_between_steps():
    selector = SQSelector(SQConfig(ratios=(0.5,)))
    error = torch.rand(64)
    masks = []
    for _ in range(5):
        masks.append(selector.draw(error))
        assert torch.equal(selector.draw(error), masks[-1])  # a step's mask: a function of (seed, step, layer)
        selector.advance("step")
    assert all(int(m.sum()) == 32 for m in masks)
    assert len({tuple(m.tolist()) for m in masks}) == 5


def test_schedule_by_step():
    selector = SQSelector(SQConfig(ratios=(0.5, 0.75, 1.0), stage_length=2, unit="step"))
    seen = []
    for _ in range(7):
        seen.append(selector.ratio)
        selector.advance("epoch")  # not the schedule's unit: no effect
        selector.advance("step")
    assert seen == [0.5, 0.5, 0.75, 0.75, 1.0, 1.0, 1.0]  # the last stage lasts to the end
    assert selector.step == 7


def test_schedule_by_epoch_reports_new_stages():
    selector = SQSelector(SQConfig(ratios=(0.5, 0.75, 0.875, 1.0), unit="epoch"))
    starts = []
    for epoch in range(5):
        for _ in range(3):
            assert selector.advance("step") is False
        starts.append(selector.advance("epoch"))
    assert starts == [True, True, True, False, False]
    assert selector.ratio == 1.0 and selector.stage == 3 and selector.step == 15


def test_ratio_zero_and_one_draw_no_randomness():
    error = torch.rand(10)
    assert not SQSelector(SQConfig(ratios=(0.0,))).draw(error).any()
    assert SQSelector(SQConfig(ratios=(1.0,))).draw(error).all()


def test_state_round_trip_gives_the_same_next_masks():
    config = SQConfig(ratios=(0.5, 0.75), stage_length=3, unit="step", seed=11)
    error = torch.rand(32)
    running = SQSelector(config)
    for _ in range(4):
        running.draw(error)
        running.advance("step")
    buffer = io.BytesIO()
    torch.save(running.state_dict(), buffer)
    buffer.seek(0)
    restored = SQSelector(config)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert (restored.stage, restored.step) == (running.stage, running.step) == (1, 4)
    for _ in range(3):
        assert torch.equal(restored.draw(error), running.draw(error))
        restored.advance("step"), running.advance("step")


def test_same_seed_same_masks_other_seed_other_masks():
    error = torch.rand(64)
    a, b, c = (SQSelector(SQConfig(ratios=(0.5,), seed=s)) for s in (0, 0, 1))
    assert torch.equal(a.draw(error), b.draw(error))
    assert not torch.equal(a.draw(error), c.draw(error))


@pytest.mark.parametrize("kwargs, message", [
    ({"ratios": (0.5, 1.5)}, r"sq.ratios=\[0.5, 1.5\]; allowed: a non-empty list of numbers in \[0, 1\]"),
    ({"ratios": ()}, r"sq.ratios=\[\]; allowed"),
    ({"probability": "cubic"}, r"sq.probability='cubic'; allowed: constant, linear, sigmoid, softmax"),
    ({"granularity": "row"}, r"sq.granularity='row'; allowed: channel, element"),
    ({"variant": "caffe"}, r"sq.variant='caffe'; allowed: paper, authors"),
    ({"unit": "batch"}, r"sq.unit='batch'; allowed: epoch, step"),
    ({"stage_length": 0}, r"sq.stage_length=0; allowed: an integer >= 1"),
])
def test_bad_config_names_key_value_and_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SQConfig(**kwargs)
