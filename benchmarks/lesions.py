"""Do heatmaps find real lesions? kad's detectors beside map baselines, on lesion masks.

Data: ``../shared/data/idrid-lesions/`` (IDRiD, one camera, 4288x2848): ``lesion/`` 27
photographs with masks ``masks/<stem>_<KIND>.png`` (MA, HE, EX, SE lesions; OD the optic
disc) and ``normal/`` 34 grade-0 photographs. The normals are split with ``--seed``: the
first ``--n-fit`` of a seeded permutation fit every detector, the rest are held out and
scored with the lesion photographs for the image AUROC (lesion against held-out normal).

Every map is measured with the code of ``kad lesions`` (:mod:`kad.screening.lesions`):
strict pointing (the map's maximum inside kad's fundus mask falls on a lesion pixel) with a
Wilson 95 % interval, pointing within 1 % of the width, pixel AUROC of every fundus pixel
pooled and AUPRO up to 30 % false-positive rate (both on a grid of at most ``--eval-side``
px a side), image AUROC, the misses on or within 5 % of the width of the optic disc, and
hits by lesion kind.

Maps:

* ``chance``: uniform random values (seeded);
* ``centre``: highest at the centre of the fundus, falling off with the distance;
* ``contrast``: no model, the local contrast of the green channel, the green channel minus
  its median blur (kernel ``kernel`` x the fundus diameter) on the photograph decoded at
  about ``side`` px wide, smoothed with a Gaussian of ``sigma`` px; bright spots rank
  highest (``contrast:abs=1``: dark ones as high, by the absolute value);
* every ``--detector NAME[:key=value,...]`` (repeatable; default: ``default``, kNN, which
  draws its map by the gradient through the pooling, patch kNN, and every other
  registered detector that draws its own map), fitted with ``kad``'s defaults for fundus
  photographs (MobileNetV2-0.35 with ``--weights``, fundus preprocessing, 448 px unless
  ``--image-size``), heatmaps by :func:`kad.screening.heatmaps.iter_heatmaps`;
  ``default`` is what ``kad fit`` fits for fundus photographs: kNN, whose scores give the
  image AUROC, and its lesion maps model (:data:`kad.screening.workflow.FUNDUS_MAPS` at
  twice the input size), whose maps are measured.

Cost, per detector: seconds per photograph of the heatmaps of the lesion and held-out
photographs (wall and CPU, every thread; decoding and preprocessing included, the network
built and traced before timing), fitting seconds, and the process's peak resident memory
during fitting and scoring (``VmHWM``, reset before each detector through
``/proc/self/clear_refs``; it includes TensorFlow and the baseline process, ~1.2 GB). The
baselines' time is their map's computation per photograph, decoding included.

Run from the repository root::

    python benchmarks/lesions.py                       # every default map, ~15 min
    python benchmarks/lesions.py --detector patchknn:k=3 --detector knn --no-baselines
    python benchmarks/lesions.py --smoke               # 3 photographs, 4 normals
    python benchmarks/lesions.py --no-baselines --image-size 896 \
        --preprocessing fundus:size=input --detector patchknn:sampling=coreset,bank_size=10000
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "idrid-lesions"
WEIGHTS = (SHARED / "weights"
           / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")
BASELINES = ("chance", "centre", "contrast")
#: ``--detector default``: what ``kad fit`` fits for fundus photographs, kNN for the scores
#: and its lesion maps model for the maps (:data:`kad.screening.workflow.FUNDUS_MAPS`).
DEFAULT = "default"


# --------------------------------------------------------------------------- baselines


def _options(spec: str) -> tuple[str, dict[str, float]]:
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key.strip()] = float(value)
    return name.strip(), options


def baseline_map(name: str, rgb: np.ndarray, shape: tuple[int, int], rng, **options):
    """The map of baseline ``name`` for the photograph ``rgb`` (decoded reduced), on a
    grid of ``shape``."""
    import cv2

    from kad.data.preprocessing import fundus_box

    if name == "chance":
        return rng.random(shape, dtype=np.float32)
    left, top, side = fundus_box(rgb)
    if name == "centre":
        rows, cols = rgb.shape[:2]
        yy, xx = np.ogrid[:rows, :cols]
        small = -np.hypot(xx + 0.5 - left - side / 2, yy + 0.5 - top - side / 2)
        return cv2.resize(small.astype(np.float32), (shape[1], shape[0]))
    if name == "contrast":
        width = options.get("side", 1024)
        scale = min(1.0, width / rgb.shape[1])
        small = cv2.resize(rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)),
                           interpolation=cv2.INTER_AREA) if scale < 1 else rgb
        green = small[..., 1]
        kernel = max(3, int(options.get("kernel", 1 / 20) * side * scale) | 1)
        contrast = green.astype(np.float32) - cv2.medianBlur(green, min(kernel, 255))
        if options.get("abs", 0):  # dark spots (haemorrhages) as high as bright ones
            contrast = np.abs(contrast)
        sigma = options.get("sigma", 2.0)
        if sigma > 0:
            contrast = cv2.GaussianBlur(contrast, (0, 0), sigma)
        return cv2.resize(contrast, (shape[1], shape[0]))
    raise SystemExit(f"unknown baseline {name!r}; use {', '.join(BASELINES)}")


# --------------------------------------------------------------------------- cost


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _default_detectors() -> list[str]:
    """kNN, patch kNN and every other registered detector that draws its own map."""
    from kad.errors import PluginError
    from kad.registry import DETECTORS, load, names

    chosen = [DEFAULT, "knn", "patchknn"]
    for name in names(DETECTORS):
        try:
            cls = load(DETECTORS, name)
        except PluginError:
            continue
        if name not in chosen and cls.draws_own_maps():
            chosen.append(name)
    return chosen


def fit_and_map(spec: str, fit_files, scored_files, args, cache: str):
    """Fit ``spec`` on ``fit_files``; heatmaps of ``scored_files``; cost."""
    from kad.data.datasets import FileSource
    from kad.data.datasets.base import Dataset
    from kad.screening.fitting import fit_pipeline
    from kad.screening.heatmaps import iter_heatmaps

    dataset = Dataset(name="idrid-normal-fit", source=FileSource(fit_files),
                      ids=[p.name for p in fit_files], target=["0"] * len(fit_files),
                      anomaly=[False] * len(fit_files), patient=[p.stem for p in fit_files],
                      kind="fundus")
    measured = _reset_peak()
    began, cpu = time.perf_counter(), time.process_time()
    options = {"backbone": args.backbone, "weights": args.weights,
               "batch_size": args.batch_size, "cache_dir": cache, "runtime": args.runtime}
    screen = None
    if spec == DEFAULT:  # kad fit's own: kNN's scores, its lesion maps model's maps
        from kad.screening.workflow import FUNDUS_MAPS, MAPS_SCALE

        screen = fit_pipeline(dataset, image_size=args.image_size,
                              preprocessing=args.preprocessing, detector="knn", **options)
        pipeline = fit_pipeline(dataset, image_size=MAPS_SCALE * screen.image_size,
                                preprocessing=screen.preprocessing, detector=FUNDUS_MAPS,
                                **options)
        screen.attach_maps(pipeline)
    else:
        pipeline = fit_pipeline(dataset, image_size=args.image_size,
                                preprocessing=args.preprocessing, detector=spec,
                                representation=args.representation, **options)
    fit_s, fit_cpu = time.perf_counter() - began, time.process_time() - cpu
    # kad fit's default: kNN's scores, its lesion maps model's maps, as kad score has them
    scorer = pipeline if screen is None else screen
    # build and trace the networks before timing (the first photograph again after)
    list(iter_heatmaps(scorer, FileSource(scored_files[:1]), keep_images=False))
    began, cpu = time.perf_counter(), time.process_time()
    maps = list(iter_heatmaps(scorer, FileSource(scored_files),
                              [str(p) for p in scored_files], keep_images=False))
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    n = len(scored_files)
    cost = {"time/photo": f"{wall / n:.2f} s ({cpu / n:.2f} CPU)",
            "fit": f"{fit_s:.0f} s ({fit_cpu:.0f} CPU)",
            "peak MiB": f"{_peak_mib():.0f}" if measured else f"{_peak_mib():.0f} (process)"}
    label = (f"{spec} ({maps[0].method}, {pipeline.image_size} px, "
             f"{'+'.join(pipeline.blocks) if len(pipeline.blocks) <= 2 else 'every block'})")
    if screen is not None:
        label = (f"{DEFAULT}: knn's scores ({screen.image_size} px), maps of "
                 f"{type(pipeline.detector).__name__} ({pipeline.image_size} px)")
    return label, {m.id: m for m in maps}, cost


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--backbone", default="mobilenet_v2:alpha=0.35")
    parser.add_argument("--image-size", type=int, default=None,
                        help="network input size (default: kad's for fundus photographs)")
    parser.add_argument("--preprocessing", default=None,
                        help="as kad fit --preprocessing, e.g. fundus:size=input to run the "
                             "fundus recipe at the network's input size (default: fundus)")
    parser.add_argument("--representation", default="concat",
                        help="blocks, as kad fit --representation (default: the detector's)")
    parser.add_argument("--runtime", default="auto", help="auto, keras or openvino")
    parser.add_argument("--detector", action="append", default=None, metavar="SPEC",
                        help="NAME[:key=value,...] or default (kad fit's kNN with its "
                             "lesion maps model), repeatable (default: default, knn, patchknn "
                             "and every registered detector that draws its own map)")
    parser.add_argument("--baseline", action="append", default=None, metavar="SPEC",
                        help=f"{', '.join(BASELINES)}[:key=value,...], repeatable "
                             "(default: all three)")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--n-fit", type=int, default=24, help="normals to fit on")
    parser.add_argument("--n-lesion", type=int, default=None, help="lesion photographs")
    parser.add_argument("--eval-side", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="3 lesion photographs, fit on 3 normals, 1 held out; kNN only, "
                             "at 64 px, on Keras")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n_fit, args.n_lesion, args.eval_side = 3, 3, 128
        args.image_size = args.image_size or 64
        args.runtime = "keras"  # no conversion to OpenVINO
        args.detector = args.detector or ["knn"]

    from kad.data.images import read_image
    from kad.screening.lesions import LesionTally, find_cases, load_truth, table

    lesion_dir, normal_dir = args.data_dir / "lesion", args.data_dir / "normal"
    if not lesion_dir.is_dir() or not normal_dir.is_dir():
        raise SystemExit(f"no lesion/ and normal/ in {args.data_dir}")
    photos = sorted(lesion_dir.glob("*.jpg"))[:args.n_lesion]
    cases, left_out = find_cases(photos, args.data_dir / "masks")
    normals = sorted(normal_dir.glob("*.jpg"))
    order = np.random.default_rng(args.seed).permutation(len(normals))
    fit_files = [normals[i] for i in order[:args.n_fit]]
    held = [normals[i] for i in order[args.n_fit:]]
    if args.smoke:
        held = held[:1]
    detectors = args.detector if args.detector is not None else _default_detectors()
    baselines = [] if args.no_baselines else (args.baseline or list(BASELINES))
    print(f"{len(cases)} lesion photographs with masks ({len(left_out)} without); normals: "
          f"fit on {len(fit_files)}, {len(held)} held out for the image AUROC (seed "
          f"{args.seed}); {args.backbone}, weights {Path(args.weights).name}; metrics on a "
          f"grid of at most {args.eval_side} px", flush=True)

    maps, costs, labels = {}, {}, {}
    cache = tempfile.mkdtemp(prefix="kad-lesions-bench-")
    for spec in detectors:
        label, found, cost = fit_and_map(spec, fit_files, [c.image for c in cases] + held,
                                         args, cache)
        labels[spec], maps[spec], costs[label] = label, found, cost
        print(f"  {label}: fitted in {cost['fit']}, heatmaps {cost['time/photo']} per "
              f"photograph, peak {cost['peak MiB']} MiB", flush=True)

    rng = np.random.default_rng(args.seed)
    names = [_options(b)[0] for b in baselines] + [labels[d] for d in detectors]
    tallies = {name: LesionTally(eval_side=args.eval_side) for name in names}
    spent = dict.fromkeys(baselines, 0.0)
    for case in cases:
        began = time.perf_counter()
        rgb = read_image(case.image, min_side=512)
        read_s = time.perf_counter() - began
        truth = load_truth(case, rgb)
        if not truth.lesion.any():
            print(f"  {case.id}: its masks mark no lesion pixel; left out")
            continue
        for spec in baselines:
            name, options = _options(spec)
            began = time.perf_counter()
            heat = baseline_map(name, rgb, truth.shape, rng, **options)
            spent[spec] += read_s + time.perf_counter() - began
            tallies[name].add(case.id, heat, truth)
        for spec in detectors:
            heat = maps[spec][str(case.image)]
            if heat.map is None:
                print(f"  {case.id}: {heat.error}; left out for {spec}")
                continue
            tallies[labels[spec]].add(case.id, heat.on_original(truth.shape), truth,
                                      score=heat.score)
    for spec in baselines:
        costs[_options(spec)[0]] = {"time/photo": f"{spent[spec] / len(cases):.2f} s"}

    rows = {}
    chance = None
    for name, tally in tallies.items():
        normal = None
        if name in labels.values():
            spec = next(s for s, v in labels.items() if v == name)
            normal = [maps[spec][str(p)].score for p in held]
        summary = tally.summary(normal)
        chance = summary.chance
        rows[name] = {**summary.row(), **costs.get(name, {})}
    print(f"\nstrict pointing by chance (the mean lesion share of the fundus): "
          f"{100 * chance:.1f} %; image AUROC: {len(cases)} lesion against {len(held)} "
          "held-out normal photographs\n")
    print(table(rows))


if __name__ == "__main__":
    main()
