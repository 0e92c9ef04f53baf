"""``sortgate model eval``: measure the shipped image-check model honestly.

A held-out set is rendered from seeds that training never uses (training: 0..9,999,999; here from
10,000,000 on), with 40 % clean parcels and 15 % of each target class. Both the int8 model and its
float32 twin classify every image with one interpreter thread, in the same run, and we report:

* per-class recall: the share of parcels holding that item which the check flags (the flag is what
  sends a parcel to inspection, whichever target class tripped it);
* the false-alarm rate: the share of clean parcels flagged;
* the confusion matrix (rows: truth, columns: top class) and top-1 accuracy, int8 and float32;
* latency of one inference (preprocessed image in, scores out), p50 and p99, int8 and float32;
* the model's size.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.vision.check import CLASSES, TARGETS, Classifier, preprocess, shipped_models

EVAL_SEED0 = 10_000_000


def held_out(n: int, seed0: int = EVAL_SEED0) -> tuple[list[np.ndarray], np.ndarray]:
    from hw_sim.xray import render

    rng = np.random.default_rng(seed0)
    labels = rng.choice(len(CLASSES), n, p=[0.4, 0.15, 0.15, 0.15, 0.15])
    return [preprocess(render(seed0 + i, CLASSES[k])) for i, k in enumerate(labels)], labels


def _run(model: Classifier, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    for img in images[:20]:  # warm-up
        model.scores(img)
    scores, times = [], []
    for img in images:
        t = time.perf_counter()
        scores.append(model.scores(img))
        times.append((time.perf_counter() - t) * 1000)
    return np.stack(scores), np.array(times)


def evaluate(
    n: int = 2500, model_dir: Path | None = None, thresholds: dict[str, float] | None = None
) -> dict[str, Any]:
    model_dir = (model_dir or shipped_models()).resolve()  # a path, never a bare (shipped) name
    thresholds = thresholds or dict.fromkeys(TARGETS, 0.5)
    images, labels = held_out(n)
    int8 = Classifier(model_dir / "xray_int8.tflite", threads=1)
    f32 = Classifier(model_dir / "xray_f32.tflite", threads=1)
    s8, t8 = _run(int8, images)
    s32, t32 = _run(f32, images)
    thr = np.array([thresholds[c] for c in TARGETS])
    flagged: np.ndarray = np.asarray((s8[:, 1:] >= thr).any(axis=1))
    top8, top32 = s8.argmax(1), s32.argmax(1)
    confusion = np.zeros((len(CLASSES), len(CLASSES)), int)
    for t, p in zip(labels, top8, strict=True):
        confusion[t, p] += 1
    clean = labels == 0

    def pct(a: np.ndarray, q: float) -> float:
        return round(float(np.percentile(a, q)), 3)

    acc8, acc32 = float((top8 == labels).mean()), float((top32 == labels).mean())
    return {
        "model": int8.version,
        "images": n,
        "seeds": f"{EVAL_SEED0}..{EVAL_SEED0 + n - 1} (never used in training)",
        "per_class": {c: int((labels == k).sum()) for k, c in enumerate(CLASSES)},
        "thresholds": thresholds,
        "recall": {c: round(float(flagged[labels == k].mean()), 4) for k, c in enumerate(CLASSES) if k},
        "false_alarm_rate": round(float(flagged[clean].mean()), 4),
        "confusion_matrix": {"classes": list(CLASSES), "rows_truth_cols_predicted": confusion.tolist()},
        "accuracy": {"int8": round(acc8, 4), "float32": round(acc32, 4),
                     "int8_minus_float32_points": round((acc8 - acc32) * 100, 2)},
        "latency_ms": {
            "threads": 1,
            "int8": {"p50": pct(t8, 50), "p99": pct(t8, 99)},
            "float32": {"p50": pct(t32, 50), "p99": pct(t32, 99)},
        },
        "int8_faster": bool(np.percentile(t8, 50) < np.percentile(t32, 50)),
        "size_bytes": {"int8": int8.size_bytes, "float32": f32.size_bytes},
        "input": {"int8_model": str(np.dtype(int8.input.dtype)), "scale": int8.input.scale,
                  "zero_point": int8.input.zero_point},
    }
