"""Tests of kdkit.losses: hand-computed values, independent numpy references, properties,
validation, dtypes and the registry."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdkit.losses import (
    LOSSES,
    FeatureLoss,
    LabelLoss,
    LogitLoss,
    build_loss,
    list_losses,
    register_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)

LOGIT_LOSSES = ["kl", "hard", "dkd", "dist"]
FEATURE_LOSSES = ["stage_mse", "fitnet", "cosine", "at", "sp", "rkd", "pkt", "cka"]
ALL_LOSSES = ["ce", *LOGIT_LOSSES, *FEATURE_LOSSES]


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def value(loss: torch.Tensor) -> float:
    assert loss.ndim == 0, f"loss must be a scalar, got shape {tuple(loss.shape)}"
    return float(loss.detach())


def np_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) along the last axis."""
    return (p * (np.log(p) - np.log(q))).sum(axis=-1)


# ----------------------------------------------------------------------------- registry


def test_every_loss_is_registered_with_the_right_kind():
    names = list_losses()
    for name in ALL_LOSSES:
        assert name in names
    assert isinstance(build_loss("ce"), LabelLoss)
    for name in LOGIT_LOSSES:
        assert isinstance(build_loss(name), LogitLoss), name
    for name in FEATURE_LOSSES:
        assert isinstance(build_loss(name), FeatureLoss), name


def test_requires_alignment_flags():
    aligned = {name: type(build_loss(name)).requires_alignment for name in FEATURE_LOSSES}
    assert aligned == {
        "stage_mse": True, "fitnet": True, "cosine": True, "at": True,
        "sp": False, "rkd": False, "pkt": False, "cka": False,
    }


def test_build_loss_passes_kwargs():
    loss = build_loss("kl", temperature=2.0)
    assert loss.temperature == 2.0
    assert "temperature=2.0" in repr(loss)


def test_unknown_name_raises_keyerror_listing_close_names():
    with pytest.raises(KeyError, match=r"did you mean 'dkd'"):
        build_loss("dkdd")
    with pytest.raises(KeyError, match="Registered: "):
        build_loss("definitely-not-a-loss")


def test_duplicate_registration_raises():
    with pytest.raises(KeyError, match="already registered"):
        @register_loss("kl")
        class Again(LogitLoss):  # noqa: F841
            pass
    assert type(build_loss("kl")).__name__ == "LogitKL"  # the original entry survives


def test_user_registered_loss_can_be_built(monkeypatch):
    # A private copy of the table: the user entry disappears when the test ends.
    monkeypatch.setattr(LOSSES, "_entries", dict(LOSSES._entries))

    @register_loss("test_l1_feature")
    class L1Feature(FeatureLoss):
        def __init__(self, scale: float = 1.0):
            super().__init__()
            self.scale = scale

        def forward(self, student_feats, teacher_feats):
            return self.scale * sum(F.l1_loss(s, t) for s, t in zip(student_feats, teacher_feats))

    assert "test_l1_feature" in list_losses()
    loss = build_loss("test_l1_feature", scale=2.0)
    assert isinstance(loss, L1Feature)
    # 2 * mean(|0 - [1, 3]|) = 2 * 2 = 4
    assert value(loss([torch.zeros(1, 2)], [torch.tensor([[1.0, 3.0]])])) == pytest.approx(4.0)


def test_user_registration_was_cleaned_up():
    assert "test_l1_feature" not in list_losses()


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("ce", {"label_smoothing": 0.1}, "label_smoothing=0.1"),
        ("kl", {}, "temperature=4.0, scale_by_t2=True, reduction='batchmean'"),
        ("hard", {}, "label_smoothing=0.0"),
        ("dkd", {}, "alpha=1.0, beta=8.0, temperature=4.0"),
        ("dist", {}, "beta=1.0, gamma=1.0, tau=1.0"),
        ("stage_mse", {"weights": [1, 2]}, "weights=[1.0, 2.0]"),
        ("at", {}, "p=2.0, beta=1000.0"),
        ("rkd", {}, "distance_weight=25.0, angle_weight=50.0"),
        ("pkt", {}, "eps=1e-07"),
        ("sp", {}, "requires_alignment=False"),
        ("cka", {}, "requires_alignment=False"),
    ],
)
def test_extra_repr_shows_hyperparameters(name, kwargs, expected):
    assert expected in repr(build_loss(name, **kwargs))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("kl", {"temperature": 0.0}), ("kl", {"reduction": "sum"}), ("dkd", {"temperature": -1.0}),
     ("dist", {"tau": 0.0}), ("at", {"p": 0.0}), ("ce", {"label_smoothing": 1.5}),
     ("hard", {"label_smoothing": -0.1})],
)
def test_bad_hyperparameters_raise(name, kwargs):
    with pytest.raises(ValueError):
        build_loss(name, **kwargs)


# ----------------------------------------------------------------------------- ce


def test_ce_by_hand():
    # logits [ln 3, 0] -> softmax [3/4, 1/4]; CE(label 0) = -ln(3/4)
    loss = build_loss("ce")(t64([[LN3, 0.0]]), torch.tensor([0]))
    assert value(loss) == pytest.approx(math.log(4 / 3))


def test_ce_accepts_soft_labels():
    # soft target [1/2, 1/2] on softmax [3/4, 1/4]: -(ln(3/4) + ln(1/4)) / 2
    loss = build_loss("ce")(t64([[LN3, 0.0]]), t64([[0.5, 0.5]]))
    assert value(loss) == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2)


# ----------------------------------------------------------------------------- kl


def test_kl_by_hand_two_classes():
    # T=1: p_t = softmax([ln3, 0]) = [3/4, 1/4], p_s = [1/2, 1/2]
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    loss = build_loss("kl", temperature=1.0)(t64([[0.0, 0.0]]), t64([[LN3, 0.0]]))
    assert value(loss) == pytest.approx(expected)
    assert expected == pytest.approx(0.130812, abs=1e-6)


def test_kl_temperature_softens_and_scales_by_t_squared():
    # T=2 on teacher logits [2 ln3, 0] gives the same softened p_t = [3/4, 1/4]: value 4 * 0.130812
    expected = 4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    loss = build_loss("kl", temperature=2.0)(t64([[0.0, 0.0]]), t64([[2 * LN3, 0.0]]))
    assert value(loss) == pytest.approx(expected)


def test_kl_t2_scaling_property():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    for temp in (1.0, 2.0, 4.0):
        scaled = build_loss("kl", temperature=temp)(s, t)
        plain = build_loss("kl", temperature=temp, scale_by_t2=False)(s, t)
        assert value(scaled) == pytest.approx(temp**2 * value(plain), rel=1e-5)


def test_kl_mean_reduction_is_batchmean_over_num_classes():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    batchmean = build_loss("kl", reduction="batchmean")(s, t)
    mean = build_loss("kl", reduction="mean")(s, t)
    assert value(mean) == pytest.approx(value(batchmean) / 7, rel=1e-5)


def test_kl_matches_numpy_reference():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    temp = 3.0
    expected = np_kl(np_softmax(t / temp), np_softmax(s / temp)).mean() * temp**2
    assert value(build_loss("kl", temperature=temp)(t64(s), t64(t))) == pytest.approx(expected)


# ----------------------------------------------------------------------------- hard


def test_hard_by_hand():
    # teacher argmax = class 1; student softmax([ln3, 0]) = [3/4, 1/4] -> CE = -ln(1/4) = ln 4
    s, t = t64([[LN3, 0.0]]), t64([[0.0, 5.0]])
    assert value(build_loss("hard")(s, t)) == pytest.approx(math.log(4))
    # smoothing 0.1 over 2 classes -> target [0.05, 0.95]: -(0.05 ln(3/4) + 0.95 ln(1/4))
    expected = -(0.05 * math.log(0.75) + 0.95 * math.log(0.25))
    assert value(build_loss("hard", label_smoothing=0.1)(s, t)) == pytest.approx(expected)


def test_hard_ignores_ground_truth_labels():
    s, t = t64([[LN3, 0.0]]), t64([[0.0, 5.0]])
    assert value(build_loss("hard")(s, t, torch.tensor([0]))) == pytest.approx(math.log(4))


# ----------------------------------------------------------------------------- dkd


def test_dkd_tckd_by_hand():
    # T=1, label 0. teacher softmax([ln2, 0, 0]) = [1/2, 1/4, 1/4], student uniform [1/3]*3.
    # b_t = [1/2, 1/2], b_s = [1/3, 2/3]: TCKD = 1/2 ln(3/2) + 1/2 ln(3/4) = 1/2 ln(9/8)
    # non-target parts: teacher [1/2, 1/2], student [1/2, 1/2] -> NCKD = 0
    loss = build_loss("dkd", temperature=1.0)(t64([[0.0, 0.0, 0.0]]), t64([[LN2, 0.0, 0.0]]), torch.tensor([0]))
    assert value(loss) == pytest.approx(0.5 * math.log(9 / 8))


def test_dkd_nckd_by_hand_and_t2_scaling():
    # T=1, label 0. teacher softmax([ln2, ln3, 0]) = [2, 3, 1]/6 -> b_t = [1/3, 2/3] = b_s: TCKD = 0
    # non-target: teacher [3/4, 1/4], student [1/2, 1/2]: NCKD = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812
    nckd = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    s, y = t64([[0.0, 0.0, 0.0]]), torch.tensor([0])
    loss = build_loss("dkd", temperature=1.0)(s, t64([[LN2, LN3, 0.0]]), y)
    assert value(loss) == pytest.approx(8 * nckd)  # beta = 8
    # T=4 on 4x the logits: same softened distributions, times T^2 = 16
    loss4 = build_loss("dkd")(s, t64([[4 * LN2, 4 * LN3, 0.0]]), y)
    assert value(loss4) == pytest.approx(16 * 8 * nckd)


def np_dkd(s, t, y, alpha, beta, temp):
    """DKD written directly from the paper's definitions."""
    out = 0.0
    for zs, zt, g in zip(s, t, y):
        ps, pt = np_softmax(zs / temp), np_softmax(zt / temp)
        bs, bt = np.array([ps[g], 1 - ps[g]]), np.array([pt[g], 1 - pt[g]])
        rest = np.arange(len(zs)) != g
        out += alpha * np_kl(bt, bs) + beta * np_kl(pt[rest] / pt[rest].sum(), ps[rest] / ps[rest].sum())
    return out / len(y) * temp**2


def test_dkd_matches_numpy_reference():
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(5, 6)) * 3, rng.normal(size=(5, 6)) * 3
    y = np.array([0, 5, 2, 2, 3])
    expected = np_dkd(s, t, y, alpha=1.0, beta=8.0, temp=4.0)
    assert value(build_loss("dkd")(t64(s), t64(t), torch.from_numpy(y))) == pytest.approx(expected)
    expected = np_dkd(s, t, y, alpha=0.5, beta=2.0, temp=1.0)
    loss = build_loss("dkd", alpha=0.5, beta=2.0, temperature=1.0)(t64(s), t64(t), torch.from_numpy(y))
    assert value(loss) == pytest.approx(expected)


def test_dkd_decomposes_kd():
    # Zhao et al. Eq. 7: KD = TCKD + (1 - p_t[g]) * NCKD, per sample
    rng = np.random.default_rng(4)
    s, t = t64(rng.normal(size=(1, 5))), t64(rng.normal(size=(1, 5)))
    y = torch.tensor([2])
    p_target = float(F.softmax(t / 4.0, dim=1)[0, 2])
    dkd = build_loss("dkd", alpha=1.0, beta=1.0 - p_target, temperature=4.0)(s, t, y)
    assert value(dkd) == pytest.approx(value(build_loss("kl", temperature=4.0)(s, t)))


def test_dkd_soft_labels_use_argmax():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    soft = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.0, 0.4, 0.6], [0.0, 0.9, 0.1, 0.0]])
    dkd = build_loss("dkd")
    assert value(dkd(s, t, soft)) == pytest.approx(value(dkd(s, t, torch.tensor([0, 3, 1]))))


def test_dkd_without_labels_raises():
    s = torch.randn(2, 3)
    with pytest.raises(ValueError, match="dkd needs the ground-truth labels"):
        build_loss("dkd")(s, s.clone())
    with pytest.raises(ValueError, match="dkd needs the ground-truth labels"):
        build_loss("dkd")(s, s.clone(), None)


def test_dkd_bad_labels_raise():
    s = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"dkd: labels must be \(2,\)"):
        build_loss("dkd")(s, s.clone(), torch.tensor([0, 1, 2]))


# ----------------------------------------------------------------------------- dist


def test_dist_by_hand_opposite_predictions():
    # student softmax rows [3/4, 1/4], [1/4, 3/4]; teacher reversed. With two values, the
    # Pearson correlation of each row and of each column is -1: inter = intra = 1 - (-1) = 2.
    s = t64([[LN3, 0.0], [0.0, LN3]])
    t = t64([[0.0, LN3], [LN3, 0.0]])
    assert value(build_loss("dist")(s, t)) == pytest.approx(4.0)
    assert value(build_loss("dist", beta=1.0, gamma=0.0)(s, t)) == pytest.approx(2.0)
    assert value(build_loss("dist", beta=0.5, gamma=2.0)(s, t)) == pytest.approx(5.0)


def test_dist_is_invariant_to_affine_changes_of_probabilities():
    # Pearson ignores scale and shift: identical predictions give exactly 0 (up to rounding)
    s = t64([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    assert value(build_loss("dist")(s, s.clone())) == pytest.approx(0.0, abs=1e-12)


def test_dist_matches_numpy_reference_and_tau_squared():
    rng = np.random.default_rng(6)
    s, t = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    tau = 2.0
    ys, yt = np_softmax(s / tau), np_softmax(t / tau)
    inter = 1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(5)])
    intra = 1 - np.mean([np.corrcoef(ys[:, k], yt[:, k])[0, 1] for k in range(4)])
    expected = tau**2 * (inter + intra)
    assert value(build_loss("dist", tau=tau)(t64(s), t64(t))) == pytest.approx(expected)


def test_dist_single_sample_has_no_intra_term():
    s, t = t64([[LN3, 0.0]]), t64([[0.0, LN3]])
    assert value(build_loss("dist")(s, t)) == pytest.approx(2.0)  # inter only


# ----------------------------------------------------------------------------- stage_mse / fitnet / cosine

# pair 1: mse(0, 1) = 1; pair 2: mse(0, 2) = 4
STUDENT_PAIRS = [torch.zeros(2, 3), torch.zeros(2, 2, 2, 2)]
TEACHER_PAIRS = [torch.ones(2, 3), torch.full((2, 2, 2, 2), 2.0)]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, 1 * 1 + 2 * 4),  # w_j = j
        ({"alpha": 2.0}, 1 * 1 + 4 * 4),  # w_j = j^2
        ({"alpha": 0.0}, 1 + 4),
        ({"weights": [0.5, 0.25]}, 0.5 * 1 + 0.25 * 4),
    ],
)
def test_stage_mse_weights(kwargs, expected):
    assert value(build_loss("stage_mse", **kwargs)(STUDENT_PAIRS, TEACHER_PAIRS)) == pytest.approx(expected)


def test_stage_mse_wrong_number_of_weights_raises():
    with pytest.raises(ValueError, match="stage_mse has 3 weights but there are 2 tapped pairs"):
        build_loss("stage_mse", weights=[1, 2, 3])(STUDENT_PAIRS, TEACHER_PAIRS)


def test_stage_mse_weights_reported():
    assert build_loss("stage_mse", alpha=2.0).stage_weights(3) == [1.0, 4.0, 9.0]


def test_fitnet_by_hand():
    # mean squared errors 1 and 4, summed over pairs
    assert value(build_loss("fitnet")(STUDENT_PAIRS, TEACHER_PAIRS)) == pytest.approx(5.0)
    # one pair, s = [1, 2], t = [0, 0]: (1 + 4) / 2
    assert value(build_loss("fitnet")([t64([[1.0, 2.0]])], [t64([[0.0, 0.0]])])) == pytest.approx(2.5)


def test_cosine_by_hand():
    # sample 1: cos([1,0],[1,1]) = 1/sqrt2; sample 2: cos([1,0],[-1,0]) = -1
    s, t = t64([[1.0, 0.0], [1.0, 0.0]]), t64([[1.0, 1.0], [-1.0, 0.0]])
    expected = ((1 - 1 / math.sqrt(2)) + 2) / 2
    assert value(build_loss("cosine")([s], [t])) == pytest.approx(expected)


# ----------------------------------------------------------------------------- at


def test_at_by_hand():
    # (B, C, H, W) = (1, 2, 1, 2). student channels [1, 0] and [1, 0]: mean_c f^2 = [1, 0] -> [1, 0]
    s = t64([[[[1.0, 0.0]], [[1.0, 0.0]]]])
    # teacher: 3 channels (channels may differ), mean_c f^2 = [0, 4/3] -> [0, 1]
    t = t64([[[[0.0, 2.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])
    # diff [1, -1] -> mean of squares 1 -> beta * 1
    assert value(build_loss("at")([s], [t])) == pytest.approx(1000.0)
    # teacher map [1, 1] -> [1/sqrt2, 1/sqrt2]: ((1 - 1/sqrt2)^2 + 1/2) / 2 = 0.292893
    t2 = t64([[[[1.0, 1.0]]]])
    assert value(build_loss("at", beta=1.0)([s], [t2])) == pytest.approx(((1 - 2**-0.5) ** 2 + 0.5) / 2)


def test_at_matches_numpy_reference_and_sums_pairs():
    rng = np.random.default_rng(7)
    pairs = [(rng.normal(size=(3, 4, 2, 3)), rng.normal(size=(3, 6, 2, 3))),
             (rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 5, 8)))]

    def att(f):
        q = (f**2).mean(axis=1).reshape(len(f), -1) if f.ndim == 4 else (f**2).mean(axis=2)
        return q / np.linalg.norm(q, axis=1, keepdims=True)

    expected = 1000 * sum(((att(s) - att(t)) ** 2).mean() for s, t in pairs)
    got = build_loss("at")([t64(s) for s, _ in pairs], [t64(t) for _, t in pairs])
    assert value(got) == pytest.approx(expected)


def test_at_tokens_are_a_one_dimensional_map():
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 4, generator=g)  # (B, N, C)
    as_nchw = lambda x: x.transpose(1, 2).unsqueeze(2)  # (B, C, 1, N)  # noqa: E731
    at = build_loss("at")
    assert value(at([s], [t])) == pytest.approx(value(at([as_nchw(s)], [as_nchw(t)])), rel=1e-6)


def test_at_rejects_vectors_and_spatial_mismatch():
    at = build_loss("at")
    with pytest.raises(ValueError, match=r"at, pair 0: .*not vectors.*\(2, 3\)"):
        at([torch.randn(2, 3)], [torch.randn(2, 3)])
    with pytest.raises(ValueError, match=r"spatial size.*\(2, 3, 4, 4\).*\(2, 3, 2, 2\)"):
        at([torch.randn(2, 3, 4, 4)], [torch.randn(2, 3, 2, 2)])
    with pytest.raises(ValueError, match="same layout"):
        at([torch.randn(2, 4, 3)], [torch.randn(2, 3, 2, 2)])


# ----------------------------------------------------------------------------- sp


def test_sp_by_hand():
    # student rows orthogonal: G_s = I (already normalised). teacher rows equal: G_t = all ones
    # -> rows [1/sqrt2, 1/sqrt2]. ||G_s - G_t||^2 = 2 * ((1 - 1/sqrt2)^2 + 1/2) = 4 - 2 sqrt2; / B^2 = 4
    s, t = t64([[1.0, 0.0], [0.0, 1.0]]), t64([[1.0, 0.0], [1.0, 0.0]])
    assert value(build_loss("sp")([s], [t])) == pytest.approx((4 - 2 * math.sqrt(2)) / 4)


def test_sp_matches_numpy_reference_with_different_widths():
    rng = np.random.default_rng(9)
    s, t = rng.normal(size=(4, 3, 2, 2)), rng.normal(size=(4, 7))

    def gram(f):
        f = f.reshape(len(f), -1)
        g = f @ f.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    expected = ((gram(s) - gram(t)) ** 2).sum() / 16
    assert value(build_loss("sp")([t64(s)], [t64(t)])) == pytest.approx(expected)


# ----------------------------------------------------------------------------- rkd


def test_rkd_by_hand():
    # student: collinear (0,0), (1,0), (2,0); teacher: equilateral triangle of side 1.
    s = t64([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    t = t64([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    # distances: student off-diagonal 1, 2, 1 (each twice), mean 8/6 -> psi 3/4, 3/2, 3/4; teacher 1.
    # Huber (|x| < 1 -> x^2 / 2): 2 * (0.5*0.25^2 + 0.5*0.5^2 + 0.5*0.25^2) = 0.375, over 9 entries
    distance = 0.375 / 9
    # angles (j != k, both != i): student cos 1 at the ends, -1 in the middle; teacher cos 60deg = 0.5.
    # diffs 0.5, -1.5, 0.5 (each twice): 2 * (0.125 + (1.5 - 0.5) + 0.125) = 2.5, over 27 entries
    angle = 2.5 / 27
    assert value(build_loss("rkd")([s], [t])) == pytest.approx(25 * distance + 50 * angle)
    assert value(build_loss("rkd", angle_weight=0.0)([s], [t])) == pytest.approx(25 * distance)
    assert value(build_loss("rkd", distance_weight=0.0)([s], [t])) == pytest.approx(50 * angle)


def np_rkd(s, t, wd=25.0, wa=50.0):
    """RKD with explicit loops over pairs and triplets (no Gram-matrix tricks)."""
    def huber(x):
        return np.where(np.abs(x) < 1, 0.5 * x**2, np.abs(x) - 0.5)

    def rel(x):
        x = x.reshape(len(x), -1)
        b = len(x)
        d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(b)] for i in range(b)])
        d = d / d[~np.eye(b, dtype=bool)].mean()
        a = np.zeros((b, b, b))
        for i, j, k in itertools.product(range(b), repeat=3):
            if j != i and k != i:
                u, v = x[j] - x[i], x[k] - x[i]
                a[i, j, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
        return d, a

    (ds, as_), (dt, at) = rel(s), rel(t)
    return wd * huber(ds - dt).mean() + wa * huber(as_ - at).mean()


def test_rkd_matches_loop_reference():
    rng = np.random.default_rng(10)
    s, t = rng.normal(size=(5, 2, 2, 2)), rng.normal(size=(5, 3))
    assert value(build_loss("rkd")([t64(s)], [t64(t)])) == pytest.approx(np_rkd(s, t), rel=1e-9)


def test_rkd_is_invariant_to_scale_and_translation():
    g = torch.Generator().manual_seed(11)
    s = torch.randn(6, 8, generator=g, dtype=torch.float64)
    assert value(build_loss("rkd")([s], [3.0 * s + 7.0])) == pytest.approx(0.0, abs=1e-9)


# ----------------------------------------------------------------------------- pkt


def test_pkt_by_hand():
    # student orthogonal: cos = I -> kernel (cos+1)/2 = [[1, 1/2], [1/2, 1]] -> rows [2/3, 1/3], [1/3, 2/3]
    # teacher parallel: cos = 1 everywhere -> rows [1/2, 1/2]
    # per row KL = 1/2 ln(3/4) + 1/2 ln(3/2) = 1/2 ln(9/8); two rows, averaged over 4 entries
    s, t = t64([[1.0, 0.0], [0.0, 1.0]]), t64([[1.0, 0.0], [2.0, 0.0]])
    assert value(build_loss("pkt")([s], [t])) == pytest.approx(math.log(9 / 8) / 4, abs=1e-6)


def test_pkt_matches_numpy_reference():
    rng = np.random.default_rng(12)
    s, t = rng.normal(size=(4, 2, 3)), rng.normal(size=(4, 5, 3))

    def probs(f):
        f = f.reshape(len(f), -1)
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        k = (f @ f.T + 1) / 2
        return k / k.sum(axis=1, keepdims=True)

    ps, pt = probs(s), probs(t)
    expected = (pt * np.log(pt / ps)).sum() / 16
    assert value(build_loss("pkt")([t64(s)], [t64(t)])) == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------- cka


def test_cka_by_hand():
    # X (centred) = [[1,0],[0,1],[-1,-1]], Y (centred) = [[1],[-1],[0]]
    # Y^T X = [1, -1] -> ||.||^2 = 2; X^T X = [[2,1],[1,2]] -> ||.||_F = sqrt 10; Y^T Y = 2
    # CKA = 2 / (sqrt10 * 2) = 1/sqrt10 -> loss 1 - 0.316228
    x, y = t64([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]), t64([[1.0], [-1.0], [0.0]])
    assert value(build_loss("cka")([x], [y])) == pytest.approx(1 - 1 / math.sqrt(10))
    # centring is done by the loss: shifted inputs give the same value
    assert value(build_loss("cka")([x + 5.0], [y - 2.0])) == pytest.approx(1 - 1 / math.sqrt(10))


def test_cka_matches_feature_space_formula():
    rng = np.random.default_rng(13)
    s, t = rng.normal(size=(6, 2, 2, 2)), rng.normal(size=(6, 3))
    x = s.reshape(6, -1) - s.reshape(6, -1).mean(axis=0)
    y = t - t.mean(axis=0)
    cka = np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    assert value(build_loss("cka")([t64(s)], [t64(t)])) == pytest.approx(1 - cka)


def test_cka_is_invariant_to_rotation_and_scale():
    g = torch.Generator().manual_seed(14)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    assert value(build_loss("cka")([x], [2.5 * x @ q])) == pytest.approx(0.0, abs=1e-9)


# ----------------------------------------------------------------------------- properties


def _features(layout: str, batch: int = 4, channels: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = {"nchw": (batch, channels, 3, 3), "tokens": (batch, 5, channels), "vectors": (batch, channels)}[layout]
    return torch.randn(*shape, generator=g)


@pytest.mark.parametrize("name", [n for n in FEATURE_LOSSES])
@pytest.mark.parametrize("layout", ["nchw", "tokens"])
def test_feature_loss_is_zero_for_identical_features(name, layout):
    f = _features(layout, seed=15).double()
    assert value(build_loss(name)([f, f * 2], [f.clone(), f * 2])) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["kl", "dkd", "dist"])
def test_logit_loss_is_zero_for_identical_logits(name):
    g = torch.Generator().manual_seed(16)
    s = torch.randn(4, 5, generator=g, dtype=torch.float64)
    assert value(build_loss(name)(s, s.clone(), torch.tensor([0, 1, 2, 4]))) == pytest.approx(0.0, abs=1e-9)


def test_hard_is_minimised_by_agreeing_with_the_teacher():
    t = torch.tensor([[0.0, 3.0, 1.0]])
    hard = build_loss("hard")
    agree, disagree = hard(10 * t, t), hard(torch.tensor([[30.0, 0.0, 10.0]]), t)
    assert value(agree) < 1e-6 < value(disagree)


def _inputs(name: str, layout: str = "nchw", dtype: torch.dtype = torch.float32):
    """Returns (student args, teacher args, extra args) for any registered loss."""
    if name == "ce":
        return torch.randn(4, 5).to(dtype), None, (torch.tensor([0, 1, 2, 3]),)
    if name in LOGIT_LOSSES:
        g = torch.Generator().manual_seed(17)
        s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
        return s.to(dtype), t.to(dtype), (torch.tensor([0, 1, 2, 3]),)
    aligned = type(build_loss(name)).requires_alignment
    s = _features(layout, channels=3, seed=18)
    t = _features(layout, channels=3 if aligned and name != "at" else 6, seed=19)
    return [s.to(dtype)], [t.to(dtype)], ()


def _call(loss, s, t, extra):
    return loss(s, *extra) if t is None else loss(s, t, *extra)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_gradient_reaches_student_only(name):
    s, t, extra = _inputs(name)
    leaf = s[0] if isinstance(s, list) else s
    leaf.requires_grad_(True)
    loss = _call(build_loss(name), s, t, extra)
    loss.backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    assert leaf.grad.abs().sum() > 0
    teacher = t[0] if isinstance(t, list) else t
    assert teacher is None or teacher.grad is None


@pytest.mark.parametrize("name", FEATURE_LOSSES)
@pytest.mark.parametrize("layout", ["nchw", "tokens", "vectors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_feature_losses_handle_every_layout_and_dtype(name, layout, dtype):
    s, t, _ = _inputs(name, layout, dtype)
    loss = build_loss(name)
    if name == "at" and layout == "vectors":
        with pytest.raises(ValueError, match=r"at, pair 0: .*\(4, 3\)"):
            loss(s, t)
        return
    s[0].requires_grad_(True)
    out = loss(s, t)
    assert out.ndim == 0 and out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert s[0].grad.dtype == dtype and torch.isfinite(s[0].grad).all()
    # bf16 inputs are computed in float32: same value as the upcast inputs
    reference = loss([s[0].detach().float()], [t[0].float()])
    assert value(out) == pytest.approx(value(reference), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", ["ce", *LOGIT_LOSSES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_logit_losses_handle_dtypes(name, dtype):
    s, t, extra = _inputs(name, dtype=dtype)
    s.requires_grad_(True)
    out = _call(build_loss(name), s, t, extra)
    assert out.ndim == 0 and out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()
    reference = _call(build_loss(name), s.detach().float(), None if t is None else t.float(), extra)
    assert value(out) == pytest.approx(value(reference), rel=1e-5)


@pytest.mark.parametrize("name", ["sp", "rkd", "pkt", "cka"])
def test_relational_losses_accept_different_widths_and_layouts(name):
    s, t = _features("nchw", channels=2, seed=20), _features("vectors", channels=9, seed=21)
    assert torch.isfinite(build_loss(name)([s], [t]))


@pytest.mark.parametrize("name", ["rkd", "cka", "sp", "pkt"])
def test_relational_losses_with_a_single_sample_are_finite(name):
    s = torch.randn(1, 4, requires_grad=True)
    out = build_loss(name)([s], [torch.randn(1, 4)])
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


def test_rkd_duplicate_samples_are_finite():
    s = torch.randn(1, 6).repeat(4, 1).requires_grad_(True)
    out = build_loss("rkd")([s], [torch.randn(4, 6)])
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


def test_dkd_extreme_logits_are_finite():
    s = torch.tensor([[80.0, -80.0, 0.0]], requires_grad=True)
    out = build_loss("dkd", temperature=1.0)(s, torch.tensor([[-90.0, 90.0, 0.0]]), torch.tensor([0]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("name", FEATURE_LOSSES)
def test_feature_losses_reject_batch_mismatch(name):
    with pytest.raises(ValueError, match=rf"^{name}, pair 0: .*batch.*\(2, 3, 2, 2\).*\(3, 3, 2, 2\)"):
        build_loss(name)([torch.randn(2, 3, 2, 2)], [torch.randn(3, 3, 2, 2)])


@pytest.mark.parametrize("name", FEATURE_LOSSES)
def test_feature_losses_reject_empty_and_unequal_lists(name):
    loss = build_loss(name)
    with pytest.raises(ValueError, match=rf"^{name} needs .*got 0 student and 0 teacher"):
        loss([], [])
    with pytest.raises(ValueError, match=rf"^{name} needs .*got 2 student and 1 teacher"):
        loss([torch.randn(2, 3)] * 2, [torch.randn(2, 3)])
    with pytest.raises(TypeError, match="wrap a single tensor in a list"):
        loss(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match=re.escape("got student (3,) and teacher (3,)")):
        loss([torch.randn(3)], [torch.randn(3)])


@pytest.mark.parametrize("name", ["stage_mse", "fitnet", "cosine"])
def test_aligned_losses_reject_shape_mismatch(name):
    with pytest.raises(ValueError, match=rf"^{name}, pair 1: .*same shape.*\(2, 4\).*\(2, 5\)"):
        build_loss(name)([torch.randn(2, 3), torch.randn(2, 4)], [torch.randn(2, 3), torch.randn(2, 5)])


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_logit_losses_reject_shape_mismatch(name):
    with pytest.raises(ValueError, match=rf"^{name}: .*\(2, 3\).*\(2, 4\)"):
        build_loss(name)(torch.randn(2, 3), torch.randn(2, 4), torch.tensor([0, 1]))


@pytest.mark.parametrize("name", ["hard", "dkd", "dist"])
def test_logit_losses_reject_non_matrix_logits(name):
    with pytest.raises(ValueError, match=rf"^{name} expects logits of shape \(batch, classes\)"):
        build_loss(name)(torch.randn(3), torch.randn(3), torch.tensor([0]))
