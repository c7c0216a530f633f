"""Screening: fit on normal images, score new ones, set the threshold, explain.

:mod:`~kad.screening.workflow` holds what ``kad fit``, ``kad score`` and ``kad threshold``
call; :mod:`~kad.screening.pipeline` the fitted record and its scoring."""
