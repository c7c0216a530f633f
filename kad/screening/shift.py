"""Does a batch of new images look like the calibration normals?

The threshold's promise (a healthy image is flagged with probability at most α) holds for
new healthy images exchangeable with the calibration normals. A batch from another camera
or clinic breaks it, and so, in another way, does a batch of mostly abnormal images: either
way the new images' conformal p-values are far from uniform as a whole.

The test is the two-sample Kolmogorov-Smirnov test of the new images' scores against the
calibration normals' scores (:func:`scipy.stats.ks_2samp`, two-sided). It asks the same
question as a one-sample test of the p-values against the uniform distribution (a p-value
is a rank among the calibration scores), but stays valid where that one does not: the
p-values of one batch are not independent (they share one calibration set) and take only
``n + 1`` values, so with a small calibration set a one-sample test would call out any
large batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: A batch is called out when the test's p-value is below this.
SHIFT_LEVEL = 0.01
TEST = "two-sample Kolmogorov-Smirnov test of the scores"


@dataclass
class BatchShift:
    """The test's result on ``n_new`` new images against ``n_calibration`` normals."""

    statistic: float
    p_value: float
    n_new: int
    n_calibration: int
    level: float = SHIFT_LEVEL

    @property
    def shifted(self) -> bool:
        return self.p_value < self.level

    def line(self) -> str:
        said = (f"({TEST} of the {self.n_new} new images against the {self.n_calibration} "
                f"calibration normals, p = {self.p_value:.2g})")
        if self.shifted:
            return ("this batch does not look like the calibration normals " + said + ": the "
                    "threshold's false-positive promise assumes new healthy images resemble "
                    "them (another camera or clinic?), unless the batch holds many abnormal "
                    "images")
        return "the new images' scores are consistent with the calibration normals' " + said


def batch_shift(pipeline, scores) -> BatchShift | None:
    """The test for the scores of a batch; None for a model without calibration normals or
    a batch of fewer than two images."""
    from scipy.stats import ks_2samp

    calibration = getattr(pipeline, "calibration", None) or {}
    cal = np.asarray(calibration.get("scores") or [], dtype=np.float64)
    new = np.asarray(scores, dtype=np.float64)
    new = new[np.isfinite(new)]
    if cal.size < 2 or new.size < 2:
        return None
    result = ks_2samp(new, cal)
    return BatchShift(float(result.statistic), float(result.pvalue), int(new.size),
                      int(cal.size))
