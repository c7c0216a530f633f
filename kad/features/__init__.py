"""Features: the backbone's blocks (:mod:`kad.features.backbones`), the runtime that runs
the network (:mod:`kad.features.runtime`), extraction and its cache
(:mod:`kad.features.extract`, :mod:`kad.features.cache`), shards and Ray."""
