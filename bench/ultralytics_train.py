"""Run in the Ultralytics tool environment (requirements-ultralytics.txt), not in mzconvert's: a YOLO detector (or
segmentation model: MODEL-seg.yaml, trained on the annotations' outlines) trained here, from its model YAML (no
weights can be downloaded), on a COCO-format folder, and exported to ONNX as `yolo export format=onnx` does. A
short CPU run on a few hundred images makes a detector far from a released one, but one whose class scores and
features are a trained network's: confident where it learned something, its activations shaped by training rather
than by initialisation.

usage: python bench/ultralytics_train.py MODEL.yaml IMAGES ANNOTATIONS.json EPOCHS OUT_DIR [--end2end]
(writes OUT_DIR/<model>.onnx; the images are linked, never copied or changed; with --end2end an NMS-free head
(YOLO26, YOLOv10) is exported end to end, its own top-K selection in the graph: nms=False)
"""

import json
import sys
from pathlib import Path

SIZE = 320


def yolo_dataset(images: Path, annotations: Path, root: Path, outlines: bool = False) -> Path:
    """The COCO annotations as Ultralytics' layout: images/train linked, labels/train/<stem>.txt with one
    `class cx cy w h` row per box (normalised; classes the categories in id order), or with `outlines` (a
    segmentation model's labels) `class x1 y1 x2 y2 ...`, the object's largest polygon; and its data YAML."""
    coco = json.loads(annotations.read_text())
    categories = sorted(c["id"] for c in coco["categories"])
    index = {category: i for i, category in enumerate(categories)}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    rows: dict[int, list[str]] = {}
    for a in coco["annotations"]:
        if a.get("iscrowd"):
            continue
        rows.setdefault(a["image_id"], []).append(a)
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for image in coco["images"]:
        source = images / image["file_name"]
        if not source.is_file():
            continue
        (root / "images" / "train" / source.name).symlink_to(source.resolve())
        width, height = image["width"], image["height"]
        lines = []
        for a in rows.get(image["id"], []):
            x, y, w, h = a["bbox"]
            if outlines:
                polygon = max(a["segmentation"], key=len)
                lines.append(f"{index[a['category_id']]} " + " ".join(
                    f"{v / (width if i % 2 == 0 else height):.6f}" for i, v in enumerate(polygon)))
                continue
            lines.append(f"{index[a['category_id']]} {(x + w / 2) / width:.6f} {(y + h / 2) / height:.6f} "
                         f"{w / width:.6f} {h / height:.6f}")
        (root / "labels" / "train" / f"{source.stem}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(json.dumps({"path": str(root), "train": "images/train", "val": "images/train",
                                "names": {i: names[c] for i, c in enumerate(categories)}}))
    return data


def main(config: str, images: Path, annotations: Path, epochs: int, out: Path, end2end: bool) -> None:
    import torch
    from ultralytics import YOLO

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out.mkdir(parents=True, exist_ok=True)
    data = yolo_dataset(images, annotations, out / "dataset", outlines=Path(config).stem.endswith("-seg"))
    yolo = YOLO(config)
    # optimizer "auto" takes AdamW at lr 0.002 * 5 / (4 + classes) for short runs: 1.2e-4 with 80 classes, where
    # 100 epochs on 209 images learned nothing (mAP50 0.003 on the training images); AdamW at 0.002 with the
    # default augmentation reached mAP50 0.03, two detections over 0.3 on 32 images. SGD at the scratch rate and
    # no augmentation, as bench/yolov5_train.py: a few hundred images are to be learned, not generalised from
    yolo.train(data=str(data), epochs=epochs, imgsz=SIZE, batch=16, device="cpu", workers=2, seed=0,
               deterministic=True, amp=False, plots=False, val=False, project=str(out), name="train",
               exist_ok=True, verbose=False, optimizer="SGD", lr0=0.01, warmup_epochs=1, mosaic=0.0,
               hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, translate=0.0, scale=0.0, fliplr=0.0)
    exported = Path(yolo.export(format="onnx", imgsz=SIZE, **({"nms": False} if end2end else {})))
    target = out / f"{Path(config).stem}.onnx"
    exported.replace(target)
    print(target)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]),
         "--end2end" in sys.argv[6:])
