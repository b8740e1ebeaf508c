"""PCA-whitening and L2 normalisation, with scikit-learn's PCA as the reference."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA as SklearnPCA

from ssl_cli.clustering.preprocess import CovarianceAccumulator, fit_pca, l2_normalize, preprocess


def _correlated_features(n: int, dim: int, seed: int) -> np.ndarray:
    """(n, dim) float32 with a large mean and a spread of variances, like post-ReLU features."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) * np.linspace(3.0, 0.1, dim)[:, None]
    return (rng.normal(size=(n, dim)) @ mixing + 50.0).astype(np.float32)


def test_whitened_fit_sample_has_identity_covariance() -> None:
    x = _correlated_features(4000, 32, seed=0)
    pca = fit_pca(x, dim=16, whiten=True)
    y = pca.transform(x)
    assert y.shape == (4000, 16) and y.dtype == np.float32
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(16), atol=1e-3)


def test_components_are_ordered_orthonormal_and_sign_pinned() -> None:
    x = _correlated_features(2000, 24, seed=1)
    pca = fit_pca(x, dim=10, whiten=True)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(10), atol=1e-5)
    # Whitening scales grow as the variance falls.
    assert np.all(np.diff(pca.scale) > 0)
    pivots = np.abs(pca.components).argmax(axis=1)
    assert np.all(pca.components[np.arange(10), pivots] > 0)


@pytest.mark.parametrize("whiten", [True, False])
def test_matches_sklearn_pca_up_to_sign(whiten: bool) -> None:
    x = _correlated_features(3000, 20, seed=2)
    ours = fit_pca(x, dim=8, whiten=whiten, eps=0.0)
    reference = SklearnPCA(n_components=8, whiten=whiten, svd_solver="full").fit(x.astype(np.float64))
    signs = np.sign(np.sum(ours.components * reference.components_, axis=1))
    np.testing.assert_allclose(ours.components, reference.components_ * signs[:, None], atol=1e-4)
    expected = reference.transform(x.astype(np.float64)) * signs
    np.testing.assert_allclose(ours.transform(x), expected, atol=2e-3, rtol=1e-3)


def test_eps_damps_only_low_variance_axes() -> None:
    x = _correlated_features(3000, 20, seed=3)
    exact = fit_pca(x, dim=8, eps=0.0)
    damped = fit_pca(x, dim=8, eps=1e-5)
    np.testing.assert_allclose(damped.scale, exact.scale, rtol=1e-4)


def test_chunked_accumulator_equals_one_shot() -> None:
    x = _correlated_features(5000, 16, seed=4)
    accumulator = CovarianceAccumulator()
    for start in range(0, 5000, 777):
        accumulator.update(x[start : start + 777])
    accumulator.update(x[:0])  # an empty chunk is a no-op
    chunked = accumulator.finalize(dim=6, whiten=True)
    one_shot = fit_pca(x, dim=6, whiten=True)
    np.testing.assert_allclose(chunked.mean, one_shot.mean, rtol=1e-6)
    np.testing.assert_allclose(chunked.components, one_shot.components, atol=1e-5)
    np.testing.assert_allclose(chunked.scale, one_shot.scale, rtol=1e-5)


def test_refitting_is_deterministic() -> None:
    x = _correlated_features(1000, 12, seed=5)
    first, second = fit_pca(x, dim=5), fit_pca(x.copy(), dim=5)
    np.testing.assert_array_equal(first.components, second.components)
    np.testing.assert_array_equal(first.scale, second.scale)


def test_unwhitened_scale_is_one() -> None:
    pca = fit_pca(_correlated_features(500, 8, seed=6), dim=4, whiten=False)
    np.testing.assert_array_equal(pca.scale, np.ones(4, dtype=np.float32))


@pytest.mark.parametrize(("n", "dim", "message"), [(100, 9, "feature dimension"), (5, 6, "fit rows")])
def test_too_large_dim_is_refused(n: int, dim: int, message: str) -> None:
    x = _correlated_features(n, 8, seed=7)
    with pytest.raises(ValueError, match=message):
        fit_pca(x, dim=dim)


def test_transform_refuses_wrong_width() -> None:
    pca = fit_pca(_correlated_features(100, 8, seed=8), dim=4)
    with pytest.raises(ValueError, match="8-dimensional"):
        pca.transform(np.zeros((3, 7), dtype=np.float32))


def test_l2_rows_have_unit_norm_and_zero_rows_stay_zero() -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=(50, 7)).astype(np.float64)
    x[[3, 17]] = 0.0
    y = l2_normalize(x)
    assert y.dtype == np.float32 and not np.isnan(y).any()
    norms = np.linalg.norm(y, axis=1)
    np.testing.assert_allclose(np.delete(norms, [3, 17]), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(y[[3, 17]], 0.0)


def test_preprocess_projects_then_normalizes() -> None:
    x = _correlated_features(800, 16, seed=10)
    pca = fit_pca(x, dim=8)
    y = preprocess(x, pca)
    assert y.shape == (800, 8) and y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(y, l2_normalize(pca.transform(x)))
    np.testing.assert_allclose(preprocess(x, None), l2_normalize(x))


def test_preprocess_refuses_non_finite_rows() -> None:
    x = _correlated_features(20, 4, seed=11)
    x[5, 2] = np.nan
    with pytest.raises(ValueError, match="row 5"):
        preprocess(x, None)
