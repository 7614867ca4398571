"""Run in the Ultralytics tool environment (requirements-ultralytics.txt): Ultralytics' own predictor on a
segmentation or oriented-box export, the ground truth of our mask and rotated-box decode.

usage: python tests/ultralytics_predict.py MODEL.onnx TASK IMAGE ...
(TASK segment or obb; writes IMAGE.npz beside each image: its detections' scores and classes, as
`YOLO(model).predict(image, conf=0.25)` gives them, and their masks on the model's input (segment) or their
rotated boxes, centre x, y, width, height and angle in the image's pixels (obb))
"""

import sys
from pathlib import Path

import numpy as np
from ultralytics import YOLO


def main(model: str, task: str, images: list[str]) -> None:
    predictor = YOLO(model, task=task)
    for image in images:
        found = predictor.predict(image, conf=0.25, iou=0.7, verbose=False)[0]
        if task == "segment":
            parts = {"masks": found.masks.data.numpy().astype(bool) if found.masks is not None
                     else np.zeros((0, 1, 1), bool)}
            boxes = found.boxes
        else:
            parts = {"rotated": found.obb.xywhr.numpy()}
            boxes = found.obb
        np.savez(Path(image).with_suffix(".npz"), scores=boxes.conf.numpy(), classes=boxes.cls.numpy().astype(np.int64),
                 **parts)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
