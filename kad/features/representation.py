"""What the pipeline hands a detector: pooled block vectors or spatial block maps.

The seam between the network and a detector is one type. A detector declares the kind of
input it consumes (``BaseDetector.input_kind``); :func:`representation_class` maps that
kind to a :class:`Representation`, and from then on extraction, fitting, scoring,
heatmaps and Ray ask the representation what to run and how to assemble its outputs,
instead of asking which kind of detector they serve.

==================  ======================  ===================================================
input_kind          representation          what the detector receives, per image
==================  ======================  ===================================================
``features``,       :class:`PooledVectors`  the spatial means of the blocks' maps,
``both``                                    concatenated: ``(Σ c_b,)``
``maps``            :class:`BlockMaps`      the blocks' maps on the finest block's grid,
                                            coarser ones resized: ``(h, w, Σ c_b)``
==================  ======================  ===================================================

Both carry the layout of their blocks, in order: name, channels and the side of the map
``(h, w)`` at the network's input size (:class:`Block`), so a detector knows where each
block's channels lie (:meth:`kad.detectors.base.BaseDetector.for_representation`).
Detectors of images (``input_kind = "images"``) are fitted on pixels by the recipes; a
fitted pipeline has no representation for them, and says so.

>>> layout = (Block("a", 2, (4, 4)), Block("b", 3, (2, 2)))
>>> maps = BlockMaps(layout)
>>> maps.channels, maps.width, maps.side
((2, 3), 5, (4, 4))
>>> import numpy as np
>>> maps.assemble([np.ones((1, 4, 4, 2)), np.zeros((1, 2, 2, 3))]).shape
(1, 4, 4, 5)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kad.errors import KadError

__all__ = [
    "MAP_STRIDES",
    "Block",
    "BlockMaps",
    "PooledVectors",
    "Representation",
    "from_record",
    "layout_of",
    "representation_class",
    "stack_maps",
]

#: A detector of maps gets, by default, the deepest block whose map has a stride of at most
#: ``MAP_STRIDES[0]`` pixels and the deepest of stride at most ``MAP_STRIDES[1]``: about 8
#: and 16, PatchCore's two layers.
MAP_STRIDES = (9, 18)
#: The spellings of "no block named": every block (pooled) or the default ones (maps).
_UNNAMED = ("concat", "picked", "")


@dataclass(frozen=True)
class Block:
    """One block of the network: its name, its number of channels and the side ``(h, w)``
    of its map at the network's input size."""

    name: str
    channels: int
    side: tuple[int, int]


@dataclass(frozen=True)
class Representation:
    """The blocks a detector sees and how the network's outputs become its input.

    Subclasses set :attr:`kind` (the detector ``input_kind`` values they serve) and
    implement :meth:`network` and :meth:`assemble`. Instances are values: equal layouts
    are equal representations, and :meth:`to_record` / :func:`from_record` round-trip them
    through a model file as plain JSON.
    """

    blocks: tuple[Block, ...]
    #: ``input_kind`` values of the detectors this representation serves.
    serves: ClassVar[tuple[str, ...]] = ()
    #: The name stored in model files.
    name: ClassVar[str] = ""
    #: Whether a block can be picked on labelled images (the paper's Table 2), which takes
    #: one detector per block on inputs at hand.
    can_pick: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not self.blocks:
            raise KadError(f"a {type(self).__name__} needs at least one block")

    # -- the layout ------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(b.channels for b in self.blocks)

    @property
    def width(self) -> int:
        """Channels of all blocks together: the last axis of what the detector gets."""
        return sum(self.channels)

    def describe(self) -> str:
        names = self.names
        return ", ".join(names) if len(names) < 6 else f"{len(names)} blocks concatenated"

    # -- what subclasses define ----------------------------------------------------------
    def network(self, model, network_blocks: list[str]):
        """The Keras model whose outputs :meth:`assemble` takes, made from ``model``, a
        model of :meth:`kad.features.backbones.Backbone.build_extractor` whose outputs are
        ``network_blocks``."""
        raise NotImplementedError

    def assemble(self, outputs: list[np.ndarray]) -> np.ndarray:
        """The detector's input for a batch, from the outputs of :meth:`network`."""
        raise NotImplementedError

    def cached(self, features, rows: np.ndarray) -> np.ndarray | None:  # noqa: ARG002
        """The detector's input for ``rows`` read from a feature cache entry
        (:class:`~kad.features.cache.FeatureSet`), or None where the cache does not hold
        this representation (the rows then go through the network); the default of a
        hook."""
        return None

    @classmethod
    def default_blocks(cls, shapes: dict[str, tuple[int, int, int]],
                       input_size: int) -> list[str]:
        """The blocks used when none are named (``shapes``: every block's map shape, in
        network order)."""
        raise NotImplementedError

    # -- records -----------------------------------------------------------------------
    def to_record(self) -> dict:
        return {"kind": self.name, "blocks": [
            {"name": b.name, "channels": int(b.channels), "side": [int(v) for v in b.side]}
            for b in self.blocks]}


@dataclass(frozen=True)
class PooledVectors(Representation):
    """Each block's map averaged over space, the blocks concatenated: ``(n, Σ c_b)``.

    The network is the extractor itself (every block pooled in the graph, so only vectors
    leave the network, and the runtime converts one model per backbone); :meth:`assemble`
    keeps this representation's blocks' columns."""

    serves: ClassVar[tuple[str, ...]] = ("features", "both")
    name: ClassVar[str] = "pooled"
    can_pick: ClassVar[bool] = True
    #: The extractor's blocks, in the order of its outputs.
    network_blocks: tuple[str, ...] = ()

    def network(self, model, network_blocks: list[str]):
        if list(network_blocks) != list(self.network_blocks):
            raise KadError(f"the network's blocks {network_blocks} are not those this "
                           f"representation was made for ({list(self.network_blocks)})")
        return model

    def assemble(self, outputs: list[np.ndarray]) -> np.ndarray:
        columns = [self.network_blocks.index(b) for b in self.names]
        return np.concatenate([np.asarray(outputs[c]) for c in columns], axis=1)

    def cached(self, features, rows: np.ndarray) -> np.ndarray:
        return features.matrix(self.names, rows)

    @classmethod
    def default_blocks(cls, shapes: dict[str, tuple[int, int, int]],
                       input_size: int) -> list[str]:  # noqa: ARG003 - the hook's signature
        return list(shapes)

    def to_record(self) -> dict:
        return {**super().to_record(), "network_blocks": list(self.network_blocks)}


@dataclass(frozen=True)
class BlockMaps(Representation):
    """The blocks' unpooled maps on the finest block's grid: ``(n, h, w, Σ c_b)``, block
    ``b``'s channels at ``slices()[b]``."""

    serves: ClassVar[tuple[str, ...]] = ("maps",)
    name: ClassVar[str] = "maps"

    @property
    def side(self) -> tuple[int, int]:
        """The grid the maps are stacked on: the finest block's."""
        return (max(b.side[0] for b in self.blocks), max(b.side[1] for b in self.blocks))

    def slices(self) -> list[slice]:
        """Where each block's channels lie on the last axis, in order."""
        edges = np.cumsum([0, *self.channels])
        return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]

    def network(self, model, network_blocks: list[str]):
        from kad.features.backbones import map_extractor

        missing = [b for b in self.names if b not in network_blocks]
        if missing:
            raise KadError(f"the network has no block {', '.join(missing)}")
        return map_extractor(model, self.names)

    def assemble(self, outputs: list[np.ndarray]) -> np.ndarray:
        return stack_maps(list(outputs))

    @classmethod
    def default_blocks(cls, shapes: dict[str, tuple[int, int, int]],
                       input_size: int) -> list[str]:
        """For each stride limit of :data:`MAP_STRIDES`, the deepest block whose map's
        stride is within it (the first block where none is)."""
        blocks = list(shapes)
        chosen: list[str] = []
        for limit in MAP_STRIDES:
            fine = [b for b in blocks if input_size / shapes[b][0] <= limit]
            block = fine[-1] if fine else blocks[0]
            if block not in chosen:
                chosen.append(block)
        return chosen


_CLASSES: tuple[type[Representation], ...] = (PooledVectors, BlockMaps)


def representation_class(detector) -> type[Representation]:
    """The representation a detector (instance or class) consumes, from its
    ``input_kind``; one line naming the detector where a fitted pipeline cannot feed it."""
    kind = getattr(detector, "input_kind", "features")
    for cls in _CLASSES:
        if kind in cls.serves:
            return cls
    name = getattr(detector, "__name__", type(detector).__name__)
    raise KadError(f"{name} takes {kind} (input_kind {kind!r}), which a fitted pipeline does "
                   "not give a detector; kad fit uses detectors of features or block maps, "
                   "and the recipes fit detectors of images on pixels")


def layout_of(model, blocks: list[str]) -> tuple[Block, ...]:
    """The :class:`Block` of each of ``blocks`` in a model of
    :meth:`~kad.features.backbones.Backbone.build_extractor`."""
    from kad.features.backbones import map_shapes

    shapes = map_shapes(model, blocks)
    return tuple(Block(b, shapes[b][2], (shapes[b][0], shapes[b][1])) for b in blocks)


def build(cls: type[Representation], model, network_blocks: list[str], named: str | list[str],
          input_size: int, backbone: str = "the backbone") -> Representation:
    """The representation of kind ``cls`` on the blocks ``named`` (``"concat"``, a comma
    list or a list; unnamed means :meth:`Representation.default_blocks`), its layout read
    from ``model``. An unknown block is named with the network's blocks."""
    from kad.features.backbones import map_shapes

    if isinstance(named, str):
        names = [] if named in _UNNAMED else [b.strip() for b in named.split(",") if b.strip()]
    else:
        names = list(named)
    if not names:
        names = cls.default_blocks(map_shapes(model, network_blocks), input_size)
    unknown = [b for b in names if b not in network_blocks]
    if unknown:
        raise KadError(f"no block {', '.join(unknown)} in {backbone}; its blocks are "
                       f"{', '.join(network_blocks)}")
    extra = {"network_blocks": tuple(network_blocks)} if cls is PooledVectors else {}
    return cls(layout_of(model, names), **extra)


def from_record(record: dict) -> Representation:
    """The representation :meth:`Representation.to_record` wrote; a malformed record is
    refused with the reason."""
    try:
        cls = {c.name: c for c in _CLASSES}[record["kind"]]
        blocks = tuple(Block(str(b["name"]), int(b["channels"]),
                             (int(b["side"][0]), int(b["side"][1])))
                       for b in record["blocks"])
        extra = ({"network_blocks": tuple(str(b) for b in record["network_blocks"])}
                 if cls is PooledVectors else {})
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise KadError(f"malformed representation record ({type(exc).__name__}: {exc})") \
            from exc
    return cls(blocks, **extra)


def stack_maps(maps: list[np.ndarray]) -> np.ndarray:
    """Block maps ``(n, h_b, w_b, c_b)`` as one ``(n, h, w, Σ c_b)`` array on the finest
    block's grid, coarser blocks resized bilinearly (as PatchCore aligns its layers)."""
    import cv2

    maps = [np.asarray(m, dtype=np.float32) for m in maps]
    h, w = max(m.shape[1] for m in maps), max(m.shape[2] for m in maps)
    out = []
    for m in maps:
        if m.shape[1:3] != (h, w):
            n, _, _, c = m.shape
            flat = m.transpose(1, 2, 0, 3).reshape(m.shape[1], m.shape[2], n * c)
            # OpenCV resizes at most 128 channels at once (CV_CN_MAX in OpenCV 5)
            parts = [cv2.resize(np.ascontiguousarray(flat[..., i:i + 128]), (w, h),
                                interpolation=cv2.INTER_LINEAR)
                     for i in range(0, n * c, 128)]
            up = np.concatenate([p.reshape(h, w, -1) for p in parts], axis=2)
            m = up.reshape(h, w, n, c).transpose(2, 0, 1, 3)
        out.append(m)
    return np.ascontiguousarray(np.concatenate(out, axis=3))
