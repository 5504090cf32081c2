"""Drift detection: does served traffic still look like the prompts the adapter was trained on?

`compare` tests a window of served prompts' features against the training prompts' features
(both from `cluster.records.prompt_features`, so both sides are measured alike), one test per
feature:

- each scalar feature: a two-sample Kolmogorov-Smirnov test. Its p-value is valid for any
  continuous distribution, and conservative for tied or discrete ones (word counts, fractions
  that are mostly 0): ties can only shrink the statistic.
- the sketch vectors: a kernel two-sample test, the unbiased MMD^2 with a Gaussian kernel whose
  bandwidth is the median pairwise distance of the pooled sample, its p-value from a permutation
  test (exact under exchangeability, so valid whatever the vectors look like).

The verdict is "drift" when any p-value is below alpha / (number of tests): Bonferroni. One
report runs nine tests; without a correction nine tests at alpha would raise a false alarm on
unchanged traffic up to nine times as often. With it, the chance that a report says "drift"
when the window comes from the training distribution is at most alpha, by construction of the
tests and the correction (the union bound), whatever the dependence between the features.

The population stability index (PSI) of each scalar is reported for readers used to it, but does
not decide: it has no false-positive rate (its folk thresholds, 0.1 and 0.25, mean different
things at different sample sizes), while the KS p-value does.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from cluster.records.prompt_features import SCALAR_FEATURES, PromptFeatures

SKETCH = "sketch"
KERNEL_SAMPLE = 1000  # items per side in the kernel test: its matrix is (2 * this)^2 floats
PSI_BINS = 10
PSI_EPSILON = 1e-4  # share given to an empty bin, so PSI stays finite
PERMUTATION_CHUNK = 256  # permutations scored per matrix product, to bound memory


@dataclass(frozen=True)
class FeatureTest:
    name: str
    statistic: float  # KS D for a scalar, unbiased MMD^2 for the sketch
    p_value: float
    psi: float | None  # None for the sketch
    reference_mean: float | None  # None for the sketch
    window_mean: float | None


@dataclass(frozen=True)
class DriftResult:
    tests: tuple[FeatureTest, ...]
    alpha: float
    threshold: float  # alpha / len(tests): Bonferroni
    reference_n: int
    window_n: int

    @property
    def drifted(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tests if t.p_value < self.threshold)

    @property
    def drift(self) -> bool:
        return bool(self.drifted)

    def summary(self) -> str:
        correction = f"after Bonferroni over {len(self.tests)} tests at alpha {self.alpha:g}"
        if self.drift:
            return f"drift: {', '.join(self.drifted)} (p < {self.threshold:.3g} {correction})"
        return f"no drift (every p >= {self.threshold:.3g} {correction})"

    def to_json(self) -> dict:
        return {
            "drift": self.drift,
            "drifted": list(self.drifted),
            "summary": self.summary(),
            "alpha": self.alpha,
            "threshold": self.threshold,
            "reference_n": self.reference_n,
            "window_n": self.window_n,
            "tests": [asdict(t) for t in self.tests],
        }


def compare(
    reference: Sequence[PromptFeatures],
    window: Sequence[PromptFeatures],
    alpha: float = 0.01,
    permutations: int = 999,
    seed: int = 0,
) -> DriftResult:
    """Test `window` (served traffic) against `reference` (training prompts); see the module.

    `permutations` must be large enough for the permutation p-value (at least
    1 / (1 + permutations)) to fall below the Bonferroni threshold, else the sketch could never
    count: at alpha 0.01 over nine tests that takes 900 or more.
    """
    for side, items in (("reference", reference), ("window", window)):
        if len(items) < 2:
            raise ValueError(f"drift needs at least 2 {side} prompts, got {len(items)}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    threshold = alpha / (len(SCALAR_FEATURES) + 1)
    if 1 / (1 + permutations) >= threshold:
        needed = math.ceil(1 / threshold)
        raise ValueError(
            f"{permutations} permutations cannot give a p-value below the Bonferroni threshold "
            f"{threshold:.3g}; use at least {needed}"
        )
    rng = np.random.default_rng(seed)
    tests = [_scalar_test(name, reference, window) for name in SCALAR_FEATURES]
    tests.append(_sketch_test(_sketches(reference), _sketches(window), permutations, rng))
    return DriftResult(tuple(tests), alpha, threshold, len(reference), len(window))


def _scalars(items: Sequence[PromptFeatures], name: str) -> np.ndarray:
    return np.array([item.scalars[name] for item in items], dtype=float)


def _sketches(items: Sequence[PromptFeatures]) -> np.ndarray:
    return np.array([item.sketch for item in items], dtype=float)


def _scalar_test(name: str, reference, window) -> FeatureTest:
    ref, win = _scalars(reference, name), _scalars(window, name)
    # "auto": the exact distribution up to 10,000 items a side, asymptotic beyond. Both assume
    # no ties; ties only shrink D, so on discrete features the p-value errs high (conservative).
    ks = stats.ks_2samp(ref, win, method="auto")
    psi, means = _psi(ref, win), (float(ref.mean()), float(win.mean()))
    return FeatureTest(name, float(ks.statistic), float(ks.pvalue), psi, *means)


def _psi(reference: np.ndarray, window: np.ndarray) -> float:
    quantiles = np.linspace(0, 1, PSI_BINS + 1)[1:-1]
    edges = np.unique(np.quantile(reference, quantiles))  # ties merge bins
    ref, win = _bin_shares(reference, edges), _bin_shares(window, edges)
    return float(np.sum((win - ref) * np.log(win / ref)))


def _bin_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    shares = counts / len(values) + PSI_EPSILON
    return shares / shares.sum()


def _sketch_test(
    reference: np.ndarray, window: np.ndarray, permutations: int, rng: np.random.Generator
) -> FeatureTest:
    ref, win = _subsample(reference, rng), _subsample(window, rng)
    kernel = _gaussian_kernel(np.concatenate([ref, win]))
    observed = _mmd2(kernel, np.arange(len(ref))[None, :])[0]
    pooled = np.tile(np.arange(len(kernel)), (permutations, 1))
    firsts = rng.permuted(pooled, axis=1)[:, : len(ref)]  # each row: one relabelled "reference"
    null = np.concatenate(
        [
            _mmd2(kernel, firsts[i : i + PERMUTATION_CHUNK])
            for i in range(0, permutations, PERMUTATION_CHUNK)
        ]
    )
    p_value = (1 + np.count_nonzero(null >= observed)) / (1 + permutations)
    return FeatureTest(SKETCH, float(observed), float(p_value), None, None, None)


def _subsample(vectors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if len(vectors) <= KERNEL_SAMPLE:
        return vectors
    return vectors[rng.choice(len(vectors), KERNEL_SAMPLE, replace=False)]


def _gaussian_kernel(vectors: np.ndarray) -> np.ndarray:
    squares = np.sum(vectors**2, axis=1)
    distances2 = np.maximum(squares[:, None] + squares[None, :] - 2 * vectors @ vectors.T, 0)
    pairs = np.sqrt(distances2[np.triu_indices(len(vectors), k=1)])
    bandwidth = np.median(pairs)
    if bandwidth == 0:  # over half the pairs identical: the median heuristic has no scale
        bandwidth = pairs.max() or 1.0
    return np.exp(-distances2 / (2 * bandwidth**2))


def _mmd2(kernel: np.ndarray, firsts: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 per row of `firsts` (the indices of one sample; the rest are the other),
    from sums of the pooled kernel matrix: no submatrix is copied per permutation."""
    total, n = len(kernel), firsts.shape[1]
    m = total - n
    labels = np.zeros((len(firsts), total))
    np.put_along_axis(labels, firsts, 1.0, axis=1)
    row_sums = kernel.sum(axis=1)
    within_x = np.einsum("pi,ij,pj->p", labels, kernel, labels, optimize=True)
    between = labels @ row_sums - within_x
    within_y = kernel.sum() - within_x - 2 * between
    diagonal = 1.0  # exp(0): the unbiased estimate leaves out each item's kernel with itself
    return (
        (within_x - n * diagonal) / (n * (n - 1))
        + (within_y - m * diagonal) / (m * (m - 1))
        - 2 * between / (n * m)
    )


def plot(
    result: DriftResult,
    reference: Sequence[PromptFeatures],
    window: Sequence[PromptFeatures],
    path: Path,
    title: str,
) -> Path:
    """One PNG: training data vs served traffic per scalar feature, and the sketch's similarity
    to the training centroid; drifted features' titles in red. Written atomically."""
    # Agg through its canvas, not pyplot: no GUI, and no process-wide backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tests = {t.name: t for t in result.tests}
    columns = 3
    rows = math.ceil(len(result.tests) / columns)
    figure = Figure(figsize=(4 * columns, 3 * rows))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis, name in zip(axes.flat, SCALAR_FEATURES, strict=False):
        test = tests[name]
        _overlay(axis, _scalars(reference, name), _scalars(window, name))
        label = f"{name}\nKS p={test.p_value:.3g}, PSI={test.psi:.3f}"
        axis.set_title(label, fontsize=9, color=_colour(result, name))
    sketch_axis = axes.flat[len(SCALAR_FEATURES)]
    _overlay(sketch_axis, *_centroid_similarity(_sketches(reference), _sketches(window)))
    sketch_axis.set_xlabel("cosine similarity to training centroid", fontsize=8)
    test = tests[SKETCH]
    sketch_axis.set_title(
        f"{SKETCH}\nMMD²={test.statistic:.3g}, permutation p={test.p_value:.3g}",
        fontsize=9,
        color=_colour(result, SKETCH),
    )
    for axis in axes.flat[len(result.tests) :]:
        axis.set_visible(False)
    figure.suptitle(f"{title}\n{result.summary()}", fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            figure.savefig(file, format="png", dpi=100)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path


def _overlay(axis, reference: np.ndarray, window: np.ndarray) -> None:
    bins = np.histogram_bin_edges(np.concatenate([reference, window]), bins=30)
    axis.hist(reference, bins=bins, density=True, alpha=0.5, label="training data")
    axis.hist(window, bins=bins, density=True, alpha=0.5, label="served traffic")
    axis.legend(fontsize=7)
    axis.tick_params(labelsize=7)


def _colour(result: DriftResult, name: str) -> str:
    return "red" if name in result.drifted else "black"


def _centroid_similarity(reference: np.ndarray, window: np.ndarray):
    """A one-dimensional view of the sketches (the test itself uses all dimensions)."""
    centroid = reference.mean(axis=0)
    centroid /= np.linalg.norm(centroid) or 1.0
    return reference @ centroid, window @ centroid
