"""The caption confidence from given token log-probabilities (captioning/confidence.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from pipeline.captioning.confidence import WINDOW, confidence, lowest_window_mean, sampled_logprobs, score_of

FLUENT = [-0.2, -0.5, -0.1, -0.3, -0.4, -0.2, -0.6, -0.1, -0.3, -0.2, -0.4, -0.3] * 2
# A fluent start, then a derailment: eight tokens the model itself found unlikely, then fluent again.
DERAILED = [*FLUENT[:10], -6.0, -7.5, -5.0, -8.0, -6.5, -7.0, -5.5, -6.0, *FLUENT[:6]]
# A repetition loop: once it starts, every repeat is nearly certain.
LOOP = [-1.0, -1.2, -0.8] + [-0.01, -0.02, -0.005] * 20
# Noise everywhere (sampling at a high temperature from a confused model).
NOISE = [-9.0, -11.0, -7.5, -10.0, -8.0, -12.0] * 4


def test_score_is_the_geometric_mean_of_the_mean_and_the_worst_window():
    result = confidence(FLUENT)
    mean = sum(FLUENT) / len(FLUENT)
    assert result is not None
    assert result.mean == pytest.approx(mean)
    assert result.window <= result.mean
    assert result.score == pytest.approx(math.exp((result.mean + result.window) / 2))
    assert 0.0 < result.score <= 1.0


def test_lowest_window_finds_the_worst_stretch_and_short_texts_use_all_tokens():
    assert lowest_window_mean([-1.0, -1.0, -9.0, -9.0, -1.0], window=2) == pytest.approx(-9.0)
    assert lowest_window_mean([-1.0, -3.0], window=WINDOW) == pytest.approx(-2.0)
    assert confidence([]) is None
    assert confidence([0.0]).score == pytest.approx(1.0)  # type: ignore[union-attr]


def test_a_derailment_scores_far_below_the_same_text_without_it_though_its_mean_is_moderate():
    fluent, derailed = confidence(FLUENT), confidence(DERAILED)
    assert fluent is not None and derailed is not None
    assert derailed.score < 0.2 * fluent.score
    # The mean alone hides much of it (a long fluent caption dilutes eight bad tokens); the window does not.
    assert math.exp(derailed.window) < 0.01 < math.exp(derailed.mean)


def test_noise_ranks_lowest_and_a_repetition_loop_scores_high_which_the_glitch_detector_must_catch():
    scores = {name: confidence(values).score for name, values in  # type: ignore[union-attr]
              {"fluent": FLUENT, "derailed": DERAILED, "loop": LOOP, "noise": NOISE}.items()}
    assert scores["noise"] < scores["derailed"] < scores["fluent"]
    assert scores["loop"] > 0.5  # honest: a loop is confident; confidence does not replace quality.py


def test_minus_infinity_and_nan_are_clamped_and_the_score_stays_in_0_1():
    result = confidence([-math.inf, float("nan"), -0.1])
    assert result is not None and 0.0 <= result.score <= 1.0 and not math.isnan(result.score)


def test_the_sampled_tokens_logprob_is_read_from_vllm_shaped_output():
    logprob = SimpleNamespace
    positions = [{5: logprob(logprob=-0.5), 9: logprob(logprob=-0.1)}, {7: logprob(logprob=-2.0)}]
    assert sampled_logprobs([5, 7], positions) == [-0.5, -2.0]  # the sampled token, not the top one
    assert sampled_logprobs([5, 7], None) is None
    assert score_of([5, 7], None) is None
    assert score_of([], []) is None
    assert score_of([5, 7], positions) == pytest.approx(math.exp(-1.25))
