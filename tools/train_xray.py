#!/usr/bin/env python3
"""Train the on-device X-ray image check and export it as a full-integer int8 TFLite model.

A development tool: it needs TensorFlow (``pip install -e '.[train]'``), the agent never does.

    .venv/bin/python tools/train_xray.py                      # synthetic data, ~5 min on 2 cores
    .venv/bin/python tools/train_xray.py --site-data /data/scans   # add a site's own labelled scans

``--site-data DIR`` reads ``DIR/<class>/*.png|jpg`` (classes: clean, battery, blade, firearm, liquid)
and mixes those images into training, so a site can retrain on real scans.

Outputs in ``--out`` (default ``models/``): ``xray_int8.tflite`` (uint8 in, uint8 out, int8 weights
and activations), ``xray_f32.tflite`` (the same network in float32, for comparison in
``sortgate model eval``) and ``xray.json`` (classes, input, version, training set).

Training seeds are 0 .. 9,999,999; ``sortgate model eval`` draws from 10,000,000 on, never used here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.vision.check import INPUT_SIZE, preprocess  # noqa: E402
from hw_sim.xray import CLASSES, render  # noqa: E402

#: share of each class in the generated training set
MIX = {"clean": 0.4, "battery": 0.15, "blade": 0.15, "firearm": 0.15, "liquid": 0.15}


def _one(args: tuple[int, str]) -> np.ndarray:
    seed, label = args
    return preprocess(render(seed, label))


def generate(n: int, seed0: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed0)
    labels = rng.choice(len(CLASSES), n, p=[MIX[c] for c in CLASSES])
    jobs = [(seed0 + i, CLASSES[k]) for i, k in enumerate(labels)]
    t = time.monotonic()
    with Pool(workers) as pool:
        images = []
        for i, img in enumerate(pool.imap(_one, jobs, chunksize=64), 1):
            images.append(img)
            if i % 1000 == 0 or i == n:
                print(f"\r  generating {i}/{n} images ({time.monotonic() - t:.0f}s)", end="", flush=True)
    print()
    return np.stack(images), labels.astype(np.int32)


def site_images(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    xs, ys = [], []
    for k, name in enumerate(CLASSES):
        for path in sorted((folder / name).glob("*")):
            if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                continue
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                print(f"  skipping unreadable {path}")
                continue
            xs.append(preprocess(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
            ys.append(k)
    print(f"  site data: {len(xs)} images from {folder}")
    if not xs:
        raise SystemExit(f"no images under {folder}/<class>/")
    return np.stack(xs), np.array(ys, np.int32)


def build_model(tf):  # type: ignore[no-untyped-def]
    layers = tf.keras.layers

    # No BatchNorm: with it the moving statistics never matched training (inference-mode accuracy
    # stuck at chance while training-mode accuracy was 98%); a network this small trains without.
    def block(x, filters, stride=1):  # type: ignore[no-untyped-def]
        return layers.Conv2D(filters, 3, strides=stride, padding="same", activation="relu")(x)

    inputs = tf.keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="image")
    x = layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = block(x, 16, 2)
    x = block(x, 32)
    x = layers.MaxPooling2D()(x)
    x = block(x, 64)
    x = layers.MaxPooling2D()(x)
    x = block(x, 64)
    x = layers.MaxPooling2D()(x)
    x = block(x, 128)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    outputs = layers.Dense(len(CLASSES), activation="softmax", name="scores")(x)
    return tf.keras.Model(inputs, outputs, name="xray_cnn")


def export(tf, model, representative: np.ndarray, work: Path) -> tuple[bytes, bytes]:  # type: ignore[no-untyped-def]
    """float32 and full-integer int8 (uint8 in and out) TFLite models.

    Keras 3 models go through a SavedModel: TFLiteConverter.from_keras_model fails on them.
    """
    saved = work / "saved_model"
    model.export(str(saved))  # an inference-only model (loaded with compile=False): no optimizer state
    f32 = tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert()
    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([r[None]] for r in representative)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.uint8
    conv.inference_output_type = tf.uint8
    return f32, conv.convert()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=14000, help="synthetic training images")
    ap.add_argument("--val", type=int, default=2000, help="synthetic validation images")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--site-data", type=Path, help="folder of a site's labelled scans: <dir>/<class>/*.png")
    ap.add_argument("--out", type=Path, default=ROOT / "models")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sortgate-train"), help="scratch folder")
    ap.add_argument("--export-only", action="store_true", help="export the model last trained into --work")
    args = ap.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.keras.utils.set_random_seed(7)
    if args.export_only:  # redo the export from the last trained model in --work
        rep, _ = generate(400, 0, args.workers)
        inference = tf.keras.models.load_model(args.work / "xray.keras", compile=False)
        f32, int8 = export(tf, inference, rep.astype(np.float32), args.work)
        write_models(tf, args, f32, int8)
        return 0
    print("[1/4] data")
    x_train, y_train = generate(args.train, 0, args.workers)
    x_val, y_val = generate(args.val, 5_000_000, args.workers)
    if args.site_data:
        xs, ys = site_images(args.site_data)
        x_train, y_train = np.concatenate([x_train, xs]), np.concatenate([y_train, ys])

    print("[2/4] training")
    model = build_model(tf)
    model.compile(optimizer=tf.keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])

    def augment(x, y):  # type: ignore[no-untyped-def]
        x = tf.image.random_flip_left_right(x)
        x = tf.image.random_flip_up_down(x)
        return x, y

    args.out.mkdir(parents=True, exist_ok=True)
    ds = (tf.data.Dataset.from_tensor_slices((x_train.astype(np.float32), y_train))
          .shuffle(4096, seed=7).map(augment).batch(64).prefetch(2))
    schedule = tf.keras.optimizers.schedules.CosineDecay(2e-3, args.epochs * len(ds))
    model.optimizer.learning_rate = schedule
    model.fit(ds, epochs=args.epochs, validation_data=(x_val.astype(np.float32), y_val), verbose=2)

    args.work.mkdir(parents=True, exist_ok=True)
    model.save(args.work / "xray.keras")  # so that an export can be redone without retraining
    print("[3/4] export")
    rep = x_train[np.random.default_rng(1).choice(len(x_train), 400, replace=False)].astype(np.float32)
    inference = tf.keras.models.load_model(args.work / "xray.keras", compile=False)
    f32, int8 = export(tf, inference, rep, args.work)
    write_models(tf, args, f32, int8)
    return 0


def write_models(tf, args: argparse.Namespace, f32: bytes, int8: bytes) -> None:  # type: ignore[no-untyped-def]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "xray_int8.tflite").write_bytes(int8)
    (args.out / "xray_f32.tflite").write_bytes(f32)
    version = "xray-cnn-" + hashlib.sha256(int8).hexdigest()[:10]
    meta = {
        "version": version,
        "classes": list(CLASSES),
        "input": {"size": INPUT_SIZE, "colour": "RGB", "dtype": "uint8"},
        "trained": {
            "synthetic_images": args.train, "validation_images": args.val, "seeds": "0..9999999",
            "site_data": str(args.site_data) if args.site_data else None, "epochs": args.epochs,
            "tensorflow": tf.__version__,
        },
        "sizes_bytes": {"int8": len(int8), "f32": len(f32)},
    }
    (args.out / "xray.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"[4/4] wrote {args.out}/xray_int8.tflite ({len(int8)} bytes), xray_f32.tflite ({len(f32)} bytes), "
          f"version {version}")


if __name__ == "__main__":
    sys.exit(main())
