"""Run in the Ultralytics tool environment (requirements-ultralytics.txt): Ultralytics' own predictor on a
segmentation export, the ground truth of our mask decode.

usage: python tests/ultralytics_masks.py MODEL.onnx IMAGE ...
(writes IMAGE.npz beside each image: its detections' masks on the model's input, their scores and classes, as
`YOLO(model).predict(image, conf=0.25)` gives them)
"""

import sys
from pathlib import Path

import numpy as np
from ultralytics import YOLO


def main(model: str, images: list[str]) -> None:
    predictor = YOLO(model, task="segment")
    for image in images:
        found = predictor.predict(image, conf=0.25, iou=0.7, verbose=False)[0]
        masks = found.masks.data.numpy().astype(bool) if found.masks is not None else np.zeros((0, 1, 1), bool)
        np.savez(Path(image).with_suffix(".npz"), masks=masks, scores=found.boxes.conf.numpy(),
                 classes=found.boxes.cls.numpy().astype(np.int64))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
