"""On-device image check: X-ray image → preprocessing (OpenCV) → int8 TFLite classifier.

The classifier runs with ``ai_edge_litert`` (LiteRT, TFLite's successor) or, where only that is
installed, ``tflite_runtime`` — the same interpreter API (after Frigate's CPU detector). It runs on
one dedicated worker thread so the event loop never blocks; inference uses one interpreter thread,
which is what the latency figures in ``models/MODEL_CARD.md`` measure.

A model file that is missing, unreadable or of the wrong shape raises ``ModelError`` at start-up:
the agent refuses to run (exit 2) rather than run without the check it was configured to make.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

INPUT_SIZE = 96
CLASSES = ("clean", "battery", "blade", "firearm", "liquid")


class ModelError(Exception):
    """The model cannot be used (missing, corrupt, or not the expected network)."""


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """Any RGB uint8 image → INPUT_SIZE x INPUT_SIZE x 3 uint8 (area-averaged)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got shape {rgb.shape}")
    return cv2.resize(rgb, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8. Raises ValueError if it is not a readable image."""
    data = np.fromfile(str(path), dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise ValueError(f"{path}: not a readable image ({data.size} bytes)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as exc:
            raise ModelError("neither ai-edge-litert nor tflite-runtime is installed") from exc
    return Interpreter


@dataclass(frozen=True)
class TensorInfo:
    dtype: type
    scale: float
    zero_point: int


#: the package the shipped models are installed as (the repository's ``models/`` folder)
SHIPPED_MODELS = "sortgate_models"


def shipped_models() -> Path:
    """The folder of the models shipped with this installation."""
    return Path(str(importlib.resources.files(SHIPPED_MODELS)))


def resolve_model(value: str | Path) -> Path:
    """The config's ``vision.model``: a bare file name (``xray_int8.tflite``) names a model shipped
    with sortgate; anything with a folder in it is a path of its own."""
    text = str(value)
    if "/" not in text and os.sep not in text:
        return shipped_models() / text
    return Path(text)


class Classifier:
    """One TFLite model. Not thread-safe: use it from one thread (the vision worker)."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        path = resolve_model(path)
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"model {path}: cannot read: {exc.strerror or exc}") from exc
        try:
            self._interp = _interpreter_class()(model_content=blob, num_threads=threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"model {path}: not a usable TFLite model: {exc}") from exc
        inp = self._interp.get_input_details()
        out = self._interp.get_output_details()
        if len(inp) != 1 or tuple(inp[0]["shape"]) != (1, INPUT_SIZE, INPUT_SIZE, 3):
            shapes = [tuple(i["shape"]) for i in inp]
            raise ModelError(f"model {path}: input must be 1x{INPUT_SIZE}x{INPUT_SIZE}x3, got {shapes}")
        if len(out) != 1 or tuple(out[0]["shape"]) != (1, len(CLASSES)):
            raise ModelError(f"model {path}: output must be 1x{len(CLASSES)}, got {[tuple(o['shape']) for o in out]}")
        self._in, self._out = inp[0], out[0]
        self.input = TensorInfo(inp[0]["dtype"], *map(float, inp[0]["quantization"]))  # type: ignore[arg-type]
        self.output = TensorInfo(out[0]["dtype"], *map(float, out[0]["quantization"]))  # type: ignore[arg-type]
        self.path = path
        self.size_bytes = len(blob)
        self.digest = hashlib.sha256(blob).hexdigest()[:10]
        meta = path.with_name("xray.json")
        self.version = f"xray-cnn-{self.digest}"
        if meta.exists():
            try:
                self.version = json.loads(meta.read_text()).get("version", self.version)
            except ValueError:
                pass

    def scores(self, image: np.ndarray) -> np.ndarray:
        """Class probabilities (float32, len(CLASSES)) for one preprocessed uint8 image."""
        x = image[None]
        if self.input.dtype == np.float32:
            x = x.astype(np.float32)
        elif self.input.dtype == np.int8:
            q = np.round(x / self.input.scale + self.input.zero_point)
            x = np.clip(q, -128, 127).astype(np.int8)
        elif self.input.scale not in (0.0, 1.0) or self.input.zero_point != 0:
            q = np.round(x / self.input.scale + self.input.zero_point)
            x = np.clip(q, 0, 255).astype(np.uint8)
        self._interp.set_tensor(self._in["index"], x)
        self._interp.invoke()
        y = self._interp.get_tensor(self._out["index"])[0]
        if self.output.dtype != np.float32:
            y = (y.astype(np.float32) - self.output.zero_point) * self.output.scale
        out: np.ndarray = y.astype(np.float32)
        return out


# --- the check as the agent runs it -------------------------------------------------------------

import asyncio  # noqa: E402
import fnmatch  # noqa: E402
import shutil  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from concurrent.futures import Future, ThreadPoolExecutor  # noqa: E402

import structlog  # noqa: E402

from agent.pipeline.decision import ImageStatus  # noqa: E402

log = structlog.get_logger("sortgate.vision")

TARGETS = CLASSES[1:]


@dataclass(frozen=True)
class ImageResult:
    status: ImageStatus
    top_class: str | None = None
    score: float | None = None
    scores: dict[str, float] | None = None
    inference_ms: float | None = None
    detail: str | None = None
    path: str | None = None

    def record(self, model_version: str, kept_path: str | None) -> dict[str, Any]:
        return {
            "status": self.status,
            "class": self.top_class,
            "score": self.score,
            "scores": self.scores,
            "inference_ms": self.inference_ms,
            "detail": self.detail,
            "model_version": model_version,
            "path": kept_path or self.path,
        }


class VisionCheck:
    """Runs the classifier on one worker thread, with thresholds, a deadline and flagged-image keeping."""

    def __init__(self, model: str | Path, thresholds: dict[str, float], keep_dir: str | Path, keep_max_mb: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision")
        # the interpreter is created on the worker thread that will use it
        self.classifier: Classifier = self._pool.submit(Classifier, model, 1).result()
        self.thresholds = thresholds
        self.keep_dir = Path(keep_dir)
        self.keep_max_bytes = keep_max_mb * 1024 * 1024

    @property
    def model_version(self) -> str:
        return self.classifier.version

    def _run(self, image: str | np.ndarray) -> ImageResult:
        t0 = time.perf_counter()
        path = str(image) if isinstance(image, str) else None
        try:
            rgb = read_image(image) if isinstance(image, str | Path) else image
            scores = self.classifier.scores(preprocess(rgb))
        except (ValueError, OSError, cv2.error) as exc:
            return ImageResult("failed", detail=f"unreadable: {exc}", path=path)
        except Exception as exc:  # noqa: BLE001 - any inference failure means no release
            return ImageResult("failed", detail=f"inference failed: {exc!r}", path=path)
        ms = (time.perf_counter() - t0) * 1000
        by_class = {c: round(float(v), 4) for c, v in zip(CLASSES, scores, strict=True)}
        hits = [c for c in TARGETS if by_class[c] >= self.thresholds[c]]
        top = max(hits, key=lambda c: by_class[c]) if hits else max(by_class, key=lambda c: by_class[c])
        return ImageResult("flagged" if hits else "pass", top, by_class[top], by_class, round(ms, 2), path=path)

    def start(self, image: str | np.ndarray) -> Future[ImageResult]:
        """Begin checking ``image`` on the worker thread (as soon as it is tied to its parcel)."""
        return self._pool.submit(self._run, image)

    async def check(
        self, image: str | np.ndarray | None, timeout_s: float, started: Future[ImageResult] | None = None
    ) -> ImageResult:
        """The result of checking ``image`` (begun by ``start`` if ``started``), or a failure once
        ``timeout_s`` has passed: a late result never decides a parcel."""
        if image is None:
            return ImageResult("missing", detail="no image arrived for this parcel")
        if started is not None and started.done():
            return started.result()  # in before it was asked for: never late
        fut = asyncio.wrap_future(started or self.start(image))  # what run_in_executor does
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                return await asyncio.shield(fut)
        except TimeoutError:
            return ImageResult("failed", detail="late: no result before the parcel's deadline",
                               path=image if isinstance(image, str) else None)

    def keep(self, image: str | np.ndarray, name: str) -> str | None:
        """Keep a flagged image for review (on the worker thread). Returns where it was kept."""
        try:
            day = time.strftime("%Y-%m-%d", time.gmtime())
            folder = self.keep_dir / day
            folder.mkdir(parents=True, exist_ok=True)
            dest = folder / f"{name}.png"
            if isinstance(image, np.ndarray):
                ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
                if not ok:
                    return None
                dest.write_bytes(buf.tobytes())
            else:
                shutil.copyfile(image, dest)
            self._rotate()
            return str(dest)
        except OSError as exc:
            log.error("cannot keep flagged image", error=str(exc))
            return None

    def _rotate(self) -> None:
        # oldest first; mtimes are coarse (a kernel tick), so ties are broken by path
        files = sorted(self.keep_dir.rglob("*.png"), key=lambda p: (p.stat().st_mtime_ns, str(p)))
        total = sum(p.stat().st_size for p in files)
        while files and total > self.keep_max_bytes:
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)

    async def after(self, result: ImageResult, image: str | np.ndarray | None, name: str, consume: bool) -> str | None:
        """Keep a flagged image; delete a checked file if the site wants it consumed."""
        loop = asyncio.get_running_loop()
        kept = None
        if result.status == "flagged" and image is not None:
            kept = await loop.run_in_executor(self._pool, self.keep, image, name)
        if consume and isinstance(image, str):
            await loop.run_in_executor(self._pool, _unlink, image)
        return kept

    def discard(self, image: Any) -> None:
        """Delete an image file that will not be used (late, or no parcel), off the loop thread."""
        if isinstance(image, str):
            self._pool.submit(_unlink, image)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class FolderSource:
    """New image files in the scanner's export folder, oldest name first.

    The scanner must write each file under another name and rename it into place (or write it
    atomically); only names matching ``pattern`` are taken. Each file is offered once.
    """

    def __init__(self, folder: str | Path, pattern: str, poll_s: float, on_image: Callable[[str, float], None]) -> None:
        self.folder = Path(folder)
        self.pattern = pattern
        self.poll_s = poll_s
        self._on_image = on_image
        self._seen: set[str] = set()

    async def run(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # files already there belong to parcels that passed before we started
        self._seen = {e.name for e in os.scandir(self.folder)}
        while True:
            names = sorted(
                e.name for e in os.scandir(self.folder)
                if e.name not in self._seen and fnmatch.fnmatch(e.name, self.pattern)
            )
            now = time.monotonic()
            for name in names:
                self._seen.add(name)
                self._on_image(str(self.folder / name), now)
            if len(self._seen) > 10_000:  # forget names no longer in the folder
                present = {e.name for e in os.scandir(self.folder)}
                self._seen &= present
            await asyncio.sleep(self.poll_s)


class CaptureSource:
    """Frames from a camera, file or stream through OpenCV's VideoCapture.

    A reader thread keeps the latest frame; ``on_trigger`` hands over the frame current
    ``delay_s`` after the trigger (the scan window), as the image of that parcel.
    """

    def __init__(self, url: str, delay_s: float, on_image: Callable[[np.ndarray, float], None]) -> None:
        self.url = url
        self.delay_s = delay_s
        self._on_image = on_image
        self._latest: np.ndarray | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _reader(self) -> None:
        cap = cv2.VideoCapture(int(self.url) if self.url.isdigit() else self.url)
        while not self._stop.is_set():
            ok, frame = cap.read()
            if not ok:
                cap.release()
                time.sleep(0.5)  # stream dropped or file ended: reopen
                cap = cv2.VideoCapture(int(self.url) if self.url.isdigit() else self.url)
                continue
            with self._lock:
                self._latest = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        cap.release()

    async def run(self) -> None:
        self._thread = threading.Thread(target=self._reader, name="capture", daemon=True)
        self._thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            self._stop.set()

    def on_trigger(self) -> None:
        asyncio.get_running_loop().call_later(self.delay_s, self._grab)

    def _grab(self) -> None:
        with self._lock:
            frame = None if self._latest is None else self._latest.copy()
        if frame is not None:
            self._on_image(frame, time.monotonic())
