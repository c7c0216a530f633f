"""scikit-learn's own estimator checks on every detector registered under ``kad.detectors``.

A kad detector is a scikit-learn outlier detector (see ``kad/detector.py``), so
``sklearn.utils.estimator_checks`` runs its API checks, its legacy checks and its outlier
checks on it (``check_outliers_train``, ``check_outliers_fit_predict``;
``check_outlier_contamination`` only reads scikit-learn's private ``_parameter_constraints``,
which kad does not declare, so it passes without testing anything: kad refuses a bad
``contamination`` itself, see tests/test_detector_contract.py). Every check passes except
the deviations listed in ``DEVIATIONS`` and ``IMAGE_ONLY_REASON``, each with its reason; a
listed deviation that starts to pass fails the test too, so that the list stays true.

Deep detectors run with their ``quick_params``. Each of their fits costs one to three
seconds of CPU (model building and tracing), so the default run gives them the checks that
need no fit and those that exercise what is their own network: repeatable fits, scores that
do not depend on the other samples, one-sample fits. The remaining checks exercise code they
share with every detector through ``BaseDetector`` (input validation, the outlier methods,
contamination), which the shallow detectors pass here and tests/test_detector_contract.py
checks on every detector, pickling included; they take minutes of CPU and run with
``pytest -m exhaustive``.
"""

from __future__ import annotations

import sys
import warnings
from functools import partial
from unittest import SkipTest

import pytest
import sklearn.utils.estimator_checks as sk_checks
from sklearn.exceptions import SkipTestWarning
from sklearn.utils.estimator_checks import estimator_checks_generator

from conftest import quick_detector
from kad.detectors.base import BaseDetector
from kad.registry import DETECTORS, discover

NAMES = list(discover(DETECTORS))
#: kad's built-ins that are Keras networks (checked against their classes below).
KERAS_BUILTINS = {"deep_svdd", "dagmm", "dsebm", "anogan", "deep_geo", "supervised"}

_KNN_SELF = (
    "kNN sets threshold_ on leave-one-out training scores (a training vector is not its own "
    "neighbour), so that the threshold applies to new data; predicting on the training set "
    "itself counts each vector as its own nearest neighbour (distance 0), which lowers its "
    "score, so fit(X).predict(X) flags fewer than the contamination share. Detecting "
    "anomalies in new images is what kad does; this is scikit-learn's novelty setting, in "
    "which scikit-learn exempts LocalOutlierFactor(novelty=True) from this count."
)
_FLOAT32_BATCH = (
    "a float32 network's outputs for a sample differ in the last bits with the size of the "
    "batch it is computed in (matrix kernels differ), and DAGMM's energy (a Mahalanobis "
    "distance under a nearly singular covariance) magnifies that to a relative 3e-6, above "
    "the check's 1e-7; kad predicts in fixed-size batches, so the same inputs in the same "
    "order give identical scores"
)
#: Deliberate deviations from scikit-learn's checks: {detector: {check: reason}}.
DEVIATIONS: dict[str, dict[str, str]] = {
    "knn": {
        "check_outliers_train": _KNN_SELF,
        "check_outliers_train(readonly_memmap=True)": _KNN_SELF,
        "check_outliers_fit_predict": _KNN_SELF,
    },
    "dagmm": {
        "check_methods_subset_invariance": _FLOAT32_BATCH,
    },
}
#: Deviations that hang on the machine's float32 kernels: they may pass elsewhere.
MACHINE_DEPENDENT = {("dagmm", "check_methods_subset_invariance")}
#: Image-only detectors take (n, height, width, 3) arrays, and detectors of block maps
#: (n, h, w, channels) arrays; scikit-learn's checks generate
#: 2-D arrays only, so their tags say ``two_d_array=False`` and scikit-learn runs no check
#: on them. They get the checks that need no data (below); their behaviour on data is
#: checked by tests/test_detector_contract.py, on images.
IMAGE_ONLY_REASON = (
    "scikit-learn's checks feed 2-D arrays; image-only detectors need (n, height, width, 3), "
    "detectors of block maps (n, h, w, channels)"
)
DATA_FREE_CHECKS = (
    "check_estimator_cloneable", "check_estimator_tags_renamed", "check_valid_tag_types",
    "check_estimator_repr", "check_no_attributes_set_in_init",
    "check_parameters_default_constructible", "check_get_params_invariance",
    "check_set_params", "check_mixin_order", "check_estimators_unfitted",
    "check_do_not_raise_errors_in_init_or_set_params", "check_outlier_contamination",
)
#: Checks of deep detectors in the default run: those that fit no model (they stop at
#: input validation or need no data) and those that test what a deep detector does itself.
DEEP_DEFAULT_CHECKS = set(DATA_FREE_CHECKS) | {
    # no fit: refused at validation
    "check_complex_data", "check_estimators_empty_data_messages", "check_fit1d",
    "check_estimator_sparse_tag", "check_estimator_sparse_array",
    "check_estimator_sparse_matrix", "check_non_transformer_estimators_n_iter",
    # the deep detector's own behaviour
    "check_fit_idempotent", "check_methods_subset_invariance", "check_fit2d_1sample",
}


def _check_id(check) -> str:
    """The check's name with its keyword arguments, as scikit-learn's test ids write it."""
    if isinstance(check, partial):
        kwargs = ",".join(f"{k}={v}" for k, v in sorted(check.keywords.items()))
        return _check_id(check.func) + (f"({kwargs})" if kwargs else "")
    return check.__name__


def _is_deep(det: BaseDetector) -> bool:
    deep = sys.modules.get("kad.detectors.deep")
    return deep is not None and isinstance(det, deep.DeepDetector)


def _run(det: BaseDetector, wanted) -> tuple[list[str], dict[str, str]]:
    """Run the scikit-learn checks whose id ``wanted(id)`` accepts; ``(passed, failed)``,
    with failures as ``{check id: "Error: message"}``."""
    if det.input_kind in ("images", "maps"):
        checks = [partial(getattr(sk_checks, c), type(det).__name__) for c in DATA_FREE_CHECKS]
        pairs = [(det, check) for check in checks]
    else:
        pairs = list(estimator_checks_generator(det, legacy=True, mark=None))
    passed, failed = [], {}
    for estimator, check in pairs:
        check_id = _check_id(check)
        if not wanted(check_id):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SkipTestWarning)
                check(estimator)
        except SkipTest:
            continue  # e.g. check_array_api_input without SCIPY_ARRAY_API
        except Exception as exc:  # a failed check: collected and reported together
            failed[check_id] = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
        else:
            passed.append(check_id)
    return passed, failed


def _assert_only_deviations(name, passed, failed, ran_any=True):
    expected = DEVIATIONS.get(name, {})
    unexpected = {c: why for c, why in failed.items() if c not in expected}
    now_passing = sorted(c for c in passed
                         if c in expected and (name, c) not in MACHINE_DEPENDENT)
    lines = [f"{c} failed: {why}" for c, why in unexpected.items()]
    lines += [f"{c} passes now: remove it from DEVIATIONS[{name!r}]" for c in now_passing]
    assert not lines, f"{name}:\n" + "\n".join(lines)
    assert passed or not ran_any, f"{name}: no scikit-learn check ran"


def _marks(name):
    return [pytest.mark.tf] if name in KERAS_BUILTINS else []


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in NAMES])
def test_scikit_learn_checks(name):
    det = quick_detector(name)
    deep = _is_deep(det)
    passed, failed = _run(det, lambda c: not deep or c in DEEP_DEFAULT_CHECKS)
    _assert_only_deviations(name, passed, failed)


@pytest.mark.exhaustive
@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in NAMES])
def test_scikit_learn_checks_of_deep_detectors_in_full(name):
    det = quick_detector(name)
    if det.input_kind in ("images", "maps"):
        pytest.skip(f"{name}: {IMAGE_ONLY_REASON}")
    if not _is_deep(det):
        pytest.skip(f"{name}: all its checks run in test_scikit_learn_checks")
    passed, failed = _run(det, lambda c: c not in DEEP_DEFAULT_CHECKS)
    _assert_only_deviations(name, passed, failed)


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in NAMES])
def test_tags_say_what_the_detector_takes(name):
    det = quick_detector(name)
    tags = det.__sklearn_tags__()
    assert tags.estimator_type == "outlier_detector"
    assert tags.input_tags.two_d_array == (det.input_kind not in ("images", "maps"))
    assert tags.target_tags.required == det.supervised
    if det.__module__.startswith("kad_plugins."):
        assert (name in KERAS_BUILTINS) == _is_deep(det), "update KERAS_BUILTINS"


#: Method names scikit-learn looks for with hasattr: a parameter of that name hides them.
SCIKIT_LEARN_METHODS = {"fit", "predict", "fit_predict", "score", "score_samples",
                        "decision_function", "predict_proba", "transform", "fit_transform"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in NAMES])
def test_no_parameter_takes_a_scikit_learn_method_name(name):
    det = quick_detector(name)
    assert not set(det.get_params(deep=False)) & SCIKIT_LEARN_METHODS
