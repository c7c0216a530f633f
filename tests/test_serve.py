"""``kad serve``: each endpoint and each refusal, through FastAPI's in-process client, on a
small model fitted once with the fast network."""

from __future__ import annotations

import base64
import threading
from concurrent.futures import Future
from dataclasses import replace

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import FAST
from synthetic import screening_folder

pytest.importorskip("fastapi")
pytestmark = pytest.mark.tf

TOKEN = "0123456789abcdef-test"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from kad.data.datasets import load_dataset
    from kad.screening.pipeline import load_pipeline
    from kad.screening.workflow import fit_model
    from kad.serve.batching import BatchScorer

    root = tmp_path_factory.mktemp("serve")
    screening_folder(root / "fit", n_normal=30, n_abnormal=6, seed=3)
    screening_folder(root / "new", n_normal=2, n_abnormal=2, seed=4)
    fit_model(load_dataset("folder", root / "fit", kind="natural"), root / "model.kad",
              cache_dir=root / "cache", runtime="keras", heatmap_scale=False,
              **FAST)  # no conversion to OpenVINO; no report drawn
    pipeline = load_pipeline(root / "model.kad")
    scorer = BatchScorer(pipeline).start()
    yield pipeline, scorer, root
    scorer.close()


def _client(served, **settings):
    from fastapi.testclient import TestClient

    from kad.serve.app import create_app
    from kad.serve.settings import ServeSettings

    return TestClient(create_app(served[1], ServeSettings(**settings), "model.kad"))


def _files(*paths, names=None):
    names = names or [p.name for p in paths]
    return [("image", (name, p.read_bytes(), "image/png"))
            for name, p in zip(names, paths, strict=True)]


def test_scores_are_those_of_kad_score_in_the_order_sent(served):
    from kad.data.datasets import FileSource
    from kad.screening.results import rank

    pipeline, _, root = served
    photos = [root / "new" / "abnormal" / "abnormal0.png", root / "new" / "normal" / "normal1.png"]
    broken = root / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    answer = _client(served).post("/score", files=[
        *_files(*photos, names=["../../etc/passwd.png", "C:\\photos\\b.png"]), *_files(broken)])
    assert answer.status_code == 200, answer.text
    images = answer.json()["images"]
    assert [i["file"] for i in images] == ["passwd.png", "b.png", "broken.png"]
    expected = pipeline.score(FileSource(photos), ids=[str(p) for p in photos])
    assert [i["score"] for i in images[:2]] == list(expected.scores)  # bit for bit
    ranked = {r.file: r for r in rank(pipeline, photos, expected)}
    for image, path in zip(images, photos, strict=False):
        row = ranked[str(path)]
        assert (image["status"], image["p_value"], image["flagged"]) == (
            "scored", row.p_value, row.flagged)
    assert images[0]["score"] > images[1]["score"]  # the speckled one is more anomalous
    assert images[2]["status"] == "unreadable" and "PNG" in images[2]["reason"]
    assert images[2]["score"] is None and images[0]["reason"] is None


def test_the_pixel_limit_applies_to_uploads_as_to_files(served, monkeypatch):
    monkeypatch.setenv("KAD_MAX_IMAGE_PIXELS", "1000")
    answer = _client(served).post("/score", files=_files(
        served[2] / "new" / "normal" / "normal0.png"))
    image = answer.json()["images"][0]
    assert answer.status_code == 200 and image["status"] == "unreadable"
    assert "KAD_MAX_IMAGE_PIXELS" in image["reason"]


def test_a_heatmap_comes_as_a_png_on_request(served):
    pipeline, _, root = served
    photo = root / "new" / "abnormal" / "abnormal1.png"
    client = _client(served)
    plain = client.post("/score", files=_files(photo)).json()["images"][0]
    drawn = client.post("/score?heatmap=true", files=_files(photo)).json()["images"][0]
    png = cv2.imdecode(np.frombuffer(base64.b64decode(drawn["heatmap_png"]), np.uint8), 1)
    assert png.shape == (pipeline.image_size, pipeline.image_size, 3)
    assert "heatmap_png" not in plain
    assert drawn["score"] == pytest.approx(plain["score"], rel=1e-4)


def test_health_model_and_the_openapi_schema(served):
    pipeline = served[0]
    client = _client(served)
    assert client.get("/health").json()["status"] == "ok"
    model = client.get("/model").json()
    assert model["threshold"]["value"] == pipeline.threshold.value
    assert model["threshold"]["method"] == pipeline.threshold.method
    assert model["n_calibration"] == pipeline.calibration["n"]
    assert "/" not in model["weights"]
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/score"]["post"]["requestBody"]["content"]
    assert "image" in body["multipart/form-data"]["schema"]["properties"]
    assert {"401", "413", "415", "422", "503", "504"} <= set(
        schema["paths"]["/score"]["post"]["responses"])


def test_requests_that_arrive_together_share_one_batch(served):
    from kad.serve.batching import BatchScorer
    from kad.serve.uploads import Upload

    pipeline, _, root = served
    scorer = BatchScorer(pipeline, max_wait=1.0).start()
    try:
        photos = sorted((root / "new").rglob("*.png"))
        futures = [scorer.submit([Upload(p.name, p.read_bytes())]) for p in photos[:3]]
        answers = [f.result(timeout=60) for f in futures]
    finally:
        scorer.close()
    assert scorer.batches == 1 and scorer.images == 3
    assert [a[0]["file"] for a in answers] == [p.name for p in photos[:3]]


@pytest.mark.parametrize("request_kwargs, status, words", [
    ({"json": {"image": "x"}}, 415, "multipart/form-data"),
    ({"files": [("photo", ("a.png", b"abc", "image/png"))]}, 422, "unexpected form field"),
    ({"data": {"note": "hello"}, "files": []}, 415, "multipart"),
    ({"content": b"--xx\r\nbroken", "headers": {
        "content-type": "multipart/form-data; boundary=xx"}}, 422, ""),
    ({"files": [("image", (f"{i}.png", b"abc", "image/png")) for i in range(3)]}, 413,
     "more than 2 images"),
    ({"files": [("image", ("a.png", b"x" * 3000, "image/png"))]}, 413, "larger than the limit"),
    ({"content": (b"x" * 1000 for _ in range(3)), "headers": {
        "content-type": "multipart/form-data; boundary=xx"}}, 413, "larger than the limit"),
])
def test_refusals_are_one_json_line_with_their_status(served, request_kwargs, status, words):
    client = _client(served, max_images=2, max_upload_mb=2000 / 2**20)
    answer = client.post("/score", **request_kwargs)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["detail"]


def test_a_token_is_required_when_one_is_set(served):
    client = _client(served, token=TOKEN)
    photo = _files(served[2] / "new" / "normal" / "normal0.png")
    assert client.post("/score", files=photo).status_code == 401
    wrong = client.get("/model", headers={"Authorization": f"Bearer {TOKEN}x"})
    assert wrong.status_code == 401 and "Bearer" in wrong.json()["detail"]
    assert wrong.headers["www-authenticate"] == "Bearer"
    right = client.post("/score", files=photo, headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200
    assert client.get("/health").status_code == 200  # for monitors: says nothing else


class _Held:
    """A scorer whose jobs wait until released."""

    def __init__(self, scorer):
        self.scorer, self.release, self.started = scorer, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.scorer, name)

    def submit(self, uploads, heatmaps=False):  # noqa: ARG002 (the scorer's signature)
        future: Future = Future()

        def finish():
            self.started.set()
            self.release.wait(30)
            if not future.cancelled():
                future.set_result([{"file": u.name, "status": "scored", "score": 0.0}
                                   for u in uploads])

        threading.Thread(target=finish, daemon=True).start()
        return future


def test_too_many_requests_in_flight_and_too_slow_answers_are_refused(served):
    from fastapi.testclient import TestClient

    from kad.serve.app import create_app
    from kad.serve.settings import ServeSettings

    held = _Held(served[1])
    photo = _files(served[2] / "new" / "normal" / "normal0.png")
    client = TestClient(create_app(held, ServeSettings(max_concurrent=1, timeout=5.0), "m"))
    first: list = []
    thread = threading.Thread(target=lambda: first.append(client.post("/score", files=photo)))
    thread.start()
    assert held.started.wait(10)
    busy = client.post("/score", files=photo)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    held.release.set()
    thread.join(10)
    assert first[0].status_code == 200

    slow = _Held(served[1])
    client = TestClient(create_app(slow, ServeSettings(timeout=0.2), "m"))
    late = client.post("/score", files=photo)
    slow.release.set()
    assert late.status_code == 504 and "--timeout" in late.json()["detail"]


def test_names_are_labels_only():
    from kad.serve.uploads import safe_name

    assert safe_name("C:\\Users\\x\\eye.jpg", 0) == "eye.jpg"
    assert safe_name("..", 2) == "image-3"
    assert safe_name(b"\x1b[31m.png", 0) == "[31m.png"
    assert len(safe_name("a" * 1000, 0)) == 128


def test_beyond_this_machine_it_refuses_to_start_without_a_token(tmp_path, monkeypatch):
    from kad.cli import app
    from kad.serve.settings import TOKEN_ENV, ServeSettings, check_exposure, is_loopback

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "absent.kad"), "--host",
                                      "0.0.0.0"])
    assert result.exit_code == 1 and "bearer token" in result.output
    assert "absent.kad" not in result.output  # refused before the model is opened
    short = tmp_path / "token"
    short.write_text("abc\n")
    result = CliRunner().invoke(app, ["serve", "m.kad", "--token-file", str(short)])
    assert result.exit_code == 1 and "fewer than 16" in result.output
    assert is_loopback("::1") and is_loopback("127.0.0.2") and not is_loopback("10.0.0.1")
    check_exposure(replace(ServeSettings(host="0.0.0.0"), token=TOKEN))


def test_an_upload_decodes_as_its_file_does(served, tmp_path):
    from kad.data.images import decode_image, read_image
    from kad.errors import ImageReadError

    big = tmp_path / "big.jpg"
    cv2.imwrite(str(big), cv2.resize(cv2.imread(str(
        served[2] / "new" / "abnormal" / "abnormal0.png")), (640, 480)))
    data = big.read_bytes()
    assert np.array_equal(decode_image(data, "big.jpg", min_side=100),
                          read_image(big, min_side=100))  # reduced at 1/4 both ways
    with pytest.raises(ImageReadError, match="truncated JPEG"):
        decode_image(data[:len(data) // 2], "cut.jpg")
    with pytest.raises(ImageReadError, match="empty"):
        decode_image(b"", "none.jpg")


def test_a_dicom_photograph_is_scored_as_kad_score_scores_its_file(served):
    from pathlib import Path

    from kad.data.datasets import FileSource

    pydicom = pytest.importorskip("pydicom")
    shipped = Path(pydicom.__file__).parent / "data" / "test_files" / "SC_rgb_rle.dcm"
    answer = _client(served).post("/score", files=[
        ("image", ("photo", shipped.read_bytes(), "application/dicom"))])  # known by DICM
    image = answer.json()["images"][0]
    assert image["status"] == "scored", image
    assert image["score"] == served[0].score(FileSource([shipped])).scores[0]
