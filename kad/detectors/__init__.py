"""Detectors: the contract every plugin follows (:mod:`kad.detectors.base`) and the base
class of the deep ones (:mod:`kad.detectors.deep`). The plugins themselves are found
through the ``kad.detectors`` entry points (:mod:`kad.registry`)."""
