"""Run in the Ultralytics tool environment (requirements-ultralytics.txt and requirements-yolov5.txt), not in
mzconvert's: a YOLOv5 detector (anchors, objectness) trained here from the `yolov5` package's model YAML (no
weights can be downloaded) on a COCO-format folder, then exported to ONNX as tests/yolov5_export.py exports
(YOLOv5's export.py, TorchScript exporter). As bench/ultralytics_train.py: a short CPU run on a few hundred
images, far from a released detector, but its scores and features are a trained network's.

The loop is YOLOv5's own parts without its train.py (which imports hub and logging packages this environment
does not install): its dataloader (letterbox, no augmentation: a few hundred images are to be learned), its
ComputeLoss with the gains train.py scales for the image size and levels, SGD with Nesterov momentum at the
scratch hyperparameters' learning rate, decaying linearly to a hundredth, one warm-up epoch.

usage: python bench/yolov5_train.py MODEL.yaml IMAGES ANNOTATIONS.json EPOCHS OUT_DIR
(writes OUT_DIR/<model>.onnx; the images are linked, never copied or changed)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ultralytics_train import SIZE, yolo_dataset  # noqa: E402  (bench/, the folder this script runs from)
from yolov5_export import export_onnx  # noqa: E402

BATCH = 16


def main(config: str, images: Path, annotations: Path, epochs: int, out: Path) -> None:
    import torch
    import yaml
    import yolov5
    from yolov5.models.yolo import Model
    from yolov5.utils.dataloaders import create_dataloader
    from yolov5.utils.loss import ComputeLoss

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    data = yolo_dataset(images, annotations, out / "dataset")
    names = json.loads(data.read_text())["names"]
    model = Model(str(Path(yolov5.__file__).parent / "models" / config), ch=3, nc=len(names))
    model.names = [names[str(i)] for i in range(len(names))]
    hyp = yaml.safe_load((Path(yolov5.__file__).parent / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())
    levels = model.model[-1].nl
    hyp["box"] *= 3 / levels  # as train.py scales them
    hyp["cls"] *= len(names) / 80 * 3 / levels
    hyp["obj"] *= (SIZE / 640) ** 2 * 3 / levels
    model.hyp, model.gr = hyp, 1.0
    loader, _ = create_dataloader(str(out / "dataset" / "images" / "train"), SIZE, BATCH, 32, hyp=hyp,
                                  augment=False, workers=2, shuffle=True, seed=0)
    loss_of = ComputeLoss(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=hyp["lr0"], momentum=hyp["momentum"], nesterov=True)
    steps = epochs * len(loader)
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for step, (batch, targets, _, _) in enumerate(loader):
            done = epoch * len(loader) + step
            scale = min(1.0, (done + 1) / len(loader)) * (1 - 0.99 * done / steps)
            for group in optimizer.param_groups:
                group["lr"] = hyp["lr0"] * scale
            loss, _ = loss_of(model(batch.float() / 255), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(loader):.3f}", file=sys.stderr, flush=True)
    model.eval()
    target = out / f"{Path(config).stem}.onnx"
    export_onnx(model, str(target))
    print(target)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
