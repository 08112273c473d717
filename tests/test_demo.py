"""The demo page: one segmentation through gradio_client equals the CLI's, bad input is a message, and the page
renders a run in a real headless Chromium (screenshot kept in tests/artifacts/ for a person to look at)."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modeling_mrovseg.cli import main as cli_main
from tests.helpers import LABELS as CHECKPOINT_LABELS
from tests.helpers import png_bomb, random_image

gradio_client = pytest.importorskip("gradio_client")
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
LABELS = "cat; dog; sofa, couch"  # three classes, the last with a synonym


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    port = free_port()
    tmp = tmp_path_factory.mktemp("server-tmp")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", str(checkpoint), "--port", str(port)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"app.py exited: {process.stdout.read()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("app.py did not start listening within 180 s")
    yield url
    downloads = list(tmp.glob("mrovseg-demo-*/*/*_labels.png"))  # the requests'
    process.terminate()  # SIGTERM (kill, docker stop): the server stops as on Ctrl-C and removes them
    assert process.wait(timeout=30) == 0
    assert downloads and not list(tmp.glob("mrovseg-demo-*")), "the users' label PNGs outlived the server"


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "street.png"
    Image.fromarray(random_image(90, 140, seed=5)).save(path)
    return path


def test_page_result_equals_the_cli(server, photo, checkpoint, tmp_path):
    client = gradio_client.Client(server, verbose=False)
    overlay, table, label_png, summary = client.predict(gradio_client.handle_file(str(photo)), LABELS, 96, 0,
                                                       api_name="/segment")
    assert cli_main(["segment", str(photo), "--model", str(checkpoint), "--labels", LABELS, "--out",
                     str(tmp_path / "cli"), "--resolution", "96", "--quiet"]) == 0
    page = np.asarray(Image.open(label_png))
    cli = np.asarray(Image.open(tmp_path / "cli" / "street_labels.png"))
    assert page.shape == (90, 140) and np.array_equal(page, cli)
    rows = table["data"]
    assert table["headers"] == ["class", "pixel share (%)", "score"]
    assert rows and {row[0] for row in rows} <= {"cat", "dog", "sofa, couch"}
    assert abs(sum(row[1] for row in rows) - 100) < 0.1
    assert Image.open(overlay).size[0] > 140  # the image plus its legend panel
    assert summary.startswith("140 x 90 px, 3 classes, resolution 96:")


@pytest.mark.parametrize("kind", ["transparent", "16-bit grey", "HEIC"])
def test_page_reads_images_as_the_cli_does(server, checkpoint, tmp_path, kind):
    """Uploads reach the model as the file itself: gradio's own RGB conversion would drop transparency (the library
    composites onto white) and clip 16-bit values to white, so the page's overlay would differ from the CLI's. A
    phone's HEIC photo is read too (gradio opens each upload with PIL first: it failed there without pillow-heif)."""
    pixels = random_image(90, 140, seed=6)
    path = tmp_path / "upload.png"
    if kind == "transparent":
        alpha = np.full((90, 140, 1), 255, np.uint8)
        alpha[:, :70] = 0
        Image.fromarray(np.concatenate([pixels, alpha], axis=-1)).save(path)
    elif kind == "HEIC":
        import pillow_heif

        pillow_heif.register_heif_opener()
        path = tmp_path / "upload.heic"
        Image.fromarray(pixels).save(path, format="HEIF")
    else:
        Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(path)
    client = gradio_client.Client(server, verbose=False)
    overlay, _, label_png, _ = client.predict(gradio_client.handle_file(str(path)), LABELS, 96, 0, api_name="/segment")
    assert cli_main(["segment", str(path), "--model", str(checkpoint), "--labels", LABELS, "--out",
                     str(tmp_path / "cli"), "--resolution", "96", "--quiet"]) == 0
    cli = tmp_path / "cli"
    assert np.array_equal(np.asarray(Image.open(label_png)), np.asarray(Image.open(cli / "upload_labels.png")))
    assert np.array_equal(np.asarray(Image.open(overlay).convert("RGB")),
                          np.asarray(Image.open(cli / "upload_overlay.png").convert("RGB")))


def test_bad_input_is_a_message_not_a_trace(server, photo, tmp_path):
    from gradio_client.exceptions import AppError

    client = gradio_client.Client(server, verbose=False)
    with pytest.raises(AppError, match="at least one class name"):
        client.predict(gradio_client.handle_file(str(photo)), " , ", 96, 0, api_name="/segment")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(AppError, match="(?i)image"):
        client.predict(gradio_client.handle_file(str(broken)), LABELS, 96, 0, api_name="/segment")
    bomb = tmp_path / "huge.png"
    bomb.write_bytes(png_bomb())
    with pytest.raises(AppError, match="pixels"):
        client.predict(gradio_client.handle_file(str(bomb)), LABELS, 96, 0, api_name="/segment")


def test_page_in_a_real_browser(server, photo):
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no system Chromium (scripts/setup.sh installs Debian's chromium where it can)")
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server, wait_until="networkidle")
        opened_with = page.get_by_label("Class names").input_value()  # the served checkpoint's own classes
        page.locator("input[type=file]").first.set_input_files(str(photo))
        page.get_by_label("Class names").fill(LABELS)
        page.get_by_role("button", name="Segment").click()
        page.get_by_text(re.compile(r"(class|classes) found")).wait_for(timeout=60_000)
        page.wait_for_timeout(1000)  # let the overlay image finish loading
        page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
        text = page.inner_text("body")
        browser.close()
    assert opened_with == ", ".join(CHECKPOINT_LABELS)
    assert "Classes found" in text and any(f"\n{name}" in text for name in ("cat", "dog", "sofa, couch"))
    assert "Examples" in text  # docs/examples/ offered to pick from
    assert Image.open(ARTIFACTS / "demo.png").size[0] == 1280


def test_each_request_keeps_its_own_label_png(checkpoint, tmp_path, monkeypatch):
    """Two uploads named image.png (every clipboard paste is): the first's download still holds the first's labels."""
    sys.path.insert(0, str(ROOT))
    from app import Segmenter

    segmenter = Segmenter(str(checkpoint))
    paths = []
    for seed in (1, 2):
        (tmp_path / str(seed)).mkdir()
        Image.fromarray(random_image(40 + 20 * seed, 50, seed=seed)).save(tmp_path / str(seed) / "image.png")
        paths.append(segmenter(str(tmp_path / str(seed) / "image.png"), LABELS, 64, 0)[2])
    assert paths[0] != paths[1] and Image.open(paths[0]).size == (50, 60) and Image.open(paths[1]).size == (50, 80)
    from app import vocabulary_text  # the page's default text reads back as the vocabulary, synonyms and all
    from modeling_mrovseg.text_classifier import parse_class_names

    for vocabulary in (["sky", "road"], ["cat", "sofa, couch"]):
        assert parse_class_names(vocabulary_text(vocabulary), allow_files=False) == vocabulary
    # a public page embeds at most MAX_CLASSES names per request (100,000 held the shared server for minutes)
    from app import MAX_CLASSES

    many = ", ".join(f"class {i}" for i in range(MAX_CLASSES + 1))
    with pytest.raises(ValueError, match=f"{MAX_CLASSES + 1} class names: this page takes at most {MAX_CLASSES}"):
        segmenter(str(tmp_path / "1" / "image.png"), many, 64, 0)
    # a checkpoint that knows more classes than that: the page's own default text is still taken, one more is not
    import app

    monkeypatch.setattr(app, "MAX_CLASSES", 2)  # below the checkpoint's three
    small = Segmenter(str(checkpoint))
    assert small(str(tmp_path / "1" / "image.png"), small.default_labels, 64, 0)[3].startswith("50 x 60 px, 3 classes")
    with pytest.raises(ValueError, match="4 class names: this page takes at most 3 per request"):
        small(str(tmp_path / "1" / "image.png"), small.default_labels + ", tree", 64, 0)


def test_a_requests_warnings_are_notes_in_its_summary(checkpoint, tmp_path):
    """A synonym of two classes or an animation's other frames were warned of in the server's log only: the page's
    user, who typed the names and uploaded the file, saw nothing of them."""
    sys.path.insert(0, str(ROOT))
    from app import Segmenter

    segmenter = Segmenter(str(checkpoint))
    frames = [Image.fromarray(random_image(40, 50, seed=seed)) for seed in (1, 2)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    summary = segmenter(str(tmp_path / "anim.gif"), "lane, street; street; sky", 64, 0)[3]
    assert summary.startswith("50 x 40 px, 3 classes, resolution 64:")
    assert summary.count(" Note: ") == 2, summary
    assert (" Note: 'street' names class 0 ('lane, street') and class 1 ('street'): what it describes is split "
            "between the two; give each class its own names.") in summary
    assert " Note: anim.gif has 2 frames (an animation or a multi-page file): only the first is segmented." in summary
    assert " Note: " not in segmenter(str(tmp_path / "anim.gif"), "sky, road", 64, 0)[3].replace(
        " Note: anim.gif", "")  # nothing else to say


def test_a_taken_port_is_a_message(checkpoint, capsys):
    """Another server on the port (a second demo, say), or a port out of range: one line naming the port, exit 2,
    not gradio's traceback."""
    sys.path.insert(0, str(ROOT))
    import app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert app.main(["--model", str(checkpoint), "--port", str(port)]) == 2
    assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--model", str(checkpoint), "--port", "99999"])
    assert exit_info.value.code == 2 and "--port 99999 must lie in [1, 65535]" in capsys.readouterr().err


def test_label_pngs_do_not_pile_up(checkpoint, tmp_path, monkeypatch):
    """A public page wrote one label PNG per request and never removed one: only the newest requests' are kept."""
    sys.path.insert(0, str(ROOT))
    import app

    monkeypatch.setattr(app, "KEEP_DOWNLOADS", 2)
    segmenter = app.Segmenter(str(checkpoint))
    photo = tmp_path / "photo.png"
    Image.fromarray(random_image(40, 50)).save(photo)
    paths = [segmenter(str(photo), LABELS, 64, 0)[2] for _ in range(4)]
    assert [Path(p).exists() for p in paths] == [False, False, True, True]
    assert len(list(segmenter.outputs.iterdir())) == 2
