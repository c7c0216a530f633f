"""kad from Python: fit, save, load, score, threshold, explain and export, as the command line
does.

Run it on a folder with ``normal/`` (and optionally ``abnormal/``) images::

    python docs/examples/python_api.py clinic/ --work kad-example/

Each step is one function of ``import kad``; ``kad fit``, ``kad score``, ``kad threshold``,
``kad explain`` and ``kad export`` call the same functions. The defaults fit InceptionResNetV2 with
ImageNet weights; ``--fast`` uses a small network with random weights instead (seconds,
for a first try; its scores mean little).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import kad

#: A small network with random (seeded) weights at 32 px: fast, for trying the API.
FAST = {"backbone": "mobilenet_v2:alpha=0.35", "weights": "none", "image_size": 32,
        "batch_size": 8}


def fit(data_dir: Path, work: Path, **settings) -> Path:
    """Fit the whole pipeline on the normal images and save it as one model file."""
    dataset = kad.load_dataset("folder", data_dir)
    run = kad.fit_model(dataset, work / "model.kad", cache_dir=work / "cache",
                        overwrite=True, **settings)
    print(f"fitted on {run.n_fitted} normal images; threshold "
          f"{run.pipeline.threshold.value:.4g} ({run.pipeline.threshold.method}); "
          f"{len(run.left_out)} image(s) used for nothing")
    return run.path


def score(model: Path, images: list[Path]) -> kad.ScoredImages:
    """Load the model file and score every image under ``images``; nothing is written."""
    pipeline = kad.load_pipeline(model)
    found = kad.score_images(pipeline, images)
    records = found.records()  # every input, scored or not, as plain dicts
    for record in records[:3]:
        print(f"{record['file']}: score {record['score']:.4g}, p-value "
              f"{record['p_value']:.3g}, {'flagged' if record['flagged'] else 'not flagged'}")
    print(f"{len(found.rows)} scored, {len(found.not_scored)} not scored, "
          f"{found.n_inputs} inputs")
    try:
        import pandas  # noqa: F401 - only to know whether a DataFrame can be made
    except ImportError:
        return found
    frame = found.to_dataframe()
    print(frame.groupby("status").size().to_string())
    return found


def threshold(model: Path, work: Path, fpr: float) -> Path:
    """Move the threshold to a false-positive rate on the calibration normals, without
    refitting; the updated model goes to a new file."""
    run = kad.set_threshold(model, fpr=fpr, out_path=work / f"model-fpr{fpr:g}.kad",
                            overwrite=True)
    print(f"threshold {run.pipeline.threshold.value:.4g} at fpr {fpr:g} "
          f"({run.n_used} calibration images)")
    return run.path


def explain(model: Path, image: Path, work: Path) -> kad.screening.heatmaps.Explained:
    """Draw where one image's score comes from."""
    pipeline = kad.load_pipeline(model)
    found = kad.explain_file(pipeline, image, work / "explain.png")
    print(f"{found.file}: score {found.score:.4g}, map by {found.method}, peak at "
          f"{found.peak} of {found.image_size} px; wrote {found.seen_png}")
    return found


def export(model: Path, work: Path, images: list[Path]) -> kad.ScoredImages:
    """Export the model for a machine without TensorFlow (the network as OpenVINO IR beside
    the model file's plain data) and score the images with the export."""
    run = kad.export_pipeline(model, work / "exported", overwrite=True)
    print(f"exported to {run.path} ({len(run.outputs)} network outputs)")
    for note in run.notes:
        print(note)
    return kad.score_images(kad.load_pipeline(run.path), images)


def main(data_dir: Path, work: Path, fpr: float = 0.2, **settings) -> dict:
    """Every step in turn; returns what each produced."""
    work.mkdir(parents=True, exist_ok=True)
    model = fit(data_dir, work, **settings)
    found = score(model, [data_dir])
    moved = threshold(model, work, fpr)
    top = Path(found.rows[0].file)  # the most suspicious image
    explained = explain(moved, top, work)
    exported = export(model, work, [data_dir])
    return {"model": model, "scores": found, "thresholded": moved, "explained": explained,
            "exported": exported}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="folder with normal/ (and abnormal/)")
    parser.add_argument("--work", type=Path, default=Path("kad-example"))
    parser.add_argument("--fpr", type=float, default=0.2)
    parser.add_argument("--fast", action="store_true", help="a small random network")
    args = parser.parse_args()
    main(args.data_dir, args.work, args.fpr, **(FAST if args.fast else {}))
