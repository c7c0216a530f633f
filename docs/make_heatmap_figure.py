"""Make ``docs/heatmap.png``, the README's heatmap figure, from generated images only.

Synthetic fundus photographs (an orange disc on black with darker branching vessels, uneven
lighting and noise) are written to a temporary folder: ``normal/`` to fit on, and one
photograph with three planted bright exudate-like spots and a dark haemorrhage-like one.
Two pipelines on MobileNetV2-0.35 block ``block_5_add`` are fitted on the normals
(:func:`kad.screening.fitting.fit_pipeline`): kNN on the pooled features (top row, gradient map)
and patch kNN on the block's map (bottom row, its own map). The photograph is explained
by each (:func:`kad.screening.heatmaps.explain`), and each row puts side by side: the photograph,
the map over the image as the model saw it, and the map on the photograph.

Run from the repository root::

    python docs/make_heatmap_figure.py --weights imagenet        # or a local weights file
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np

SIZE = 256


def fundus(rng: np.random.Generator, lesions: bool = False) -> np.ndarray:
    """One synthetic fundus photograph, RGB uint8."""
    image = np.zeros((SIZE, SIZE, 3), np.float32)
    centre = (SIZE // 2 + int(rng.integers(-6, 7)), SIZE // 2 + int(rng.integers(-6, 7)))
    radius = int(SIZE * 0.45)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    light = 1.0 - 0.45 * np.hypot(xx - centre[0], yy - centre[1]) / radius
    colour = np.array([205, 95, 45], np.float32) * rng.uniform(0.85, 1.1)
    disc = (np.hypot(xx - centre[0], yy - centre[1]) <= radius)[..., None]
    image += disc * colour * light[..., None]
    side = 1 if rng.random() < 0.5 else -1  # left or right eye
    head = (centre[0] + side * int(radius * 0.45), centre[1] + int(rng.integers(-8, 9)))
    for _ in range(8):  # vessels: random walks out of the optic disc
        point = np.array(head, np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        width = int(rng.integers(2, 4))
        for _ in range(60):
            angle += rng.normal(0, 0.25)
            step = point + 4 * np.array([np.cos(angle), np.sin(angle)], np.float32)
            cv2.line(image, tuple(int(v) for v in point), tuple(int(v) for v in step),
                     (120, 35, 20), width)
            point = step
    cv2.circle(image, head, 14, (245, 200, 140), -1)  # optic disc
    if lesions:
        for k in range(3):
            spot = (centre[0] - side * 45 + 16 * k, centre[1] + 35 - 10 * k)
            cv2.circle(image, spot, 6 + k, (250, 230, 120), -1)
        cv2.circle(image, (centre[0] - side * 10, centre[1] - 60), 9, (70, 15, 10), -1)
    image = cv2.GaussianBlur(image, (0, 0), 1.0) + rng.normal(0, 3, image.shape)
    return np.clip(image * disc, 0, 255).astype(np.uint8)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("heatmap.png"))
    parser.add_argument("--n", type=int, default=60, help="normal images to fit on")
    args = parser.parse_args(argv)

    from kad.data.datasets import FileSource, load_dataset
    from kad.screening.fitting import fit_pipeline
    from kad.screening.heatmaps import explain, overlay

    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(prefix="kad-figure-"))
    (root / "normal").mkdir()
    for i in range(args.n):
        cv2.imwrite(str(root / "normal" / f"{i:03d}.png"),
                    cv2.cvtColor(fundus(rng), cv2.COLOR_RGB2BGR))
    sick = root / "lesions.png"
    cv2.imwrite(str(sick), cv2.cvtColor(fundus(rng, lesions=True), cv2.COLOR_RGB2BGR))
    dataset = load_dataset("folder", root, kind="fundus")
    rows = []
    for detector in ("knn", "patchknn"):
        pipeline = fit_pipeline(dataset, backbone="mobilenet_v2:alpha=0.35",
                                weights=args.weights, detector=detector,
                                representation="block_5_add", batch_size=16,
                                cache_dir=root / "cache")
        found = explain(pipeline, FileSource([sick]), ids=[sick.name])[0]
        panels = [
            cv2.resize(found.original, (224, 224), interpolation=cv2.INTER_AREA),
            cv2.resize(overlay(found.seen, found.map), (224, 224),
                       interpolation=cv2.INTER_AREA),
            cv2.resize(overlay(found.original, found.on_original()), (224, 224),
                       interpolation=cv2.INTER_AREA),
        ]
        cv2.putText(panels[0], detector, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.55,
                    (255, 255, 255), 1, cv2.LINE_AA)
        gap = np.full((224, 8, 3), 255, np.uint8)
        rows.append(np.hstack([panels[0], gap, panels[1], gap, panels[2]]))
        explained = ("" if found.explained is None else
                     f", {found.map.sum():.3f} of {found.explained:.3f} explained")
        print(f"{detector}: score {found.score:.3f} (threshold "
              f"{pipeline.threshold.value:.3f}), method {found.method}{explained}")
    figure = np.vstack([rows[0], np.full((8, rows[0].shape[1], 3), 255, np.uint8), rows[1]])
    cv2.imwrite(str(args.out), cv2.cvtColor(figure, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {args.out}")

if __name__ == "__main__":
    main()
