"""Issue 24: a MediaPipe SSD detector (anchors from its graph's generator options) through the recipe `mzconvert
init` writes, in one run: the figures of the README's anchor-spec `ssd` row.

The detector is a file the `mediapipe` wheel on the package index ships (default: its pose detector); init reads
its anchors from the head's levels and proposes what MediaPipe's detector graphs run around it (the image
letterboxed, padded black; weighted NMS at IoU 0.3), its int8 with tuned weights and an Ethos-U target. A
.tflite holds neither the class names nor the score threshold of MediaPipe's graph, so the recipe gets them
(--labels, --score: the pose detector's, `person` and its pose_detection_cpu.pbtxt's TensorsToDetections
min_score_thresh 0.2), the only edits; --greedy and --stretch undo init's NMS and letterbox, to compare.
Calibration: the COCO train images; verify: every COCO val image of the mirror. Each int8 variant init tunes
(tune_steps) gets a copy NAME-untuned beside it, its weights as quantized: what the tuning gains, on the same
images. Printed: whether the recipe passes its floors as written, then every variant's detections matched with
float32 (same label, IoU >= 0.9, score >= 0.3; an int8 under LiteRT's reference kernels, the arithmetic of the
NPU it targets) with the 95 % interval of image resamples, each output's SQNR as verify judges it (a box or
keypoint where either model shows a detection, class logits as the scores shown), and the tuning's output
error. No AP: the pose detector boxes a person's face (its keypoints place the body), not the person COCO boxes.

Usage: .venv/bin/python bench/mediapipe_detectors.py [--mirror DIR] [--package mediapipe==0.10.14]
       [--member mediapipe/modules/pose_detection/pose_detection.tflite] [--labels person] [--score 0.2]
       [--greedy] [--stretch] [--tune-steps N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml
from init_builds import built_as_written, mz, tuning_lines, untuned_copies  # bench/, the script's own folder

from mzconvert.preprocess import list_images
from mzconvert.stages.verify import matched_share_text

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mirror", default=str(ROOT.parent / "shared" / "mirror"))
    parser.add_argument("--package", default="mediapipe==0.10.14", help="the wheel on the index that ships it")
    parser.add_argument("--member", default="mediapipe/modules/pose_detection/pose_detection.tflite",
                        help="the detector's path inside the wheel")
    parser.add_argument("--labels", nargs="+", default=["person"], help="its class names, as its graph has them")
    parser.add_argument("--score", type=float, default=0.2, help="its graph's score threshold")
    parser.add_argument("--greedy", action="store_true",
                        help="suppress greedily, not by init's proposal (MediaPipe's weighted NMS)")
    parser.add_argument("--stretch", action="store_true",
                        help="stretch the image to the input, not init's proposal (letterboxed as MediaPipe does)")
    parser.add_argument("--tune-steps", type=int,
                        help="tune every calibrated int8 variant's weights this many steps, not as init proposes")
    args = parser.parse_args()
    coco = Path(args.mirror) / "coco"
    work = Path(tempfile.mkdtemp(prefix="mzconvert-mediapipe-"))
    made = mz("init", "detector", "--from", f"pypi:{args.package}", "--member", args.member,
              "--to", str(work), "--calibration", str(coco / "train2017"), "--verify", str(coco / "val2017"))
    if made.returncode != 0:
        raise SystemExit(f"init failed:\n{made.stderr[-3000:]}")
    path = work / "detector.yaml"
    recipe = yaml.safe_load(path.read_text())
    recipe["postprocess"] |= {"labels": args.labels, "nms_score_threshold": args.score,
                              **({"nms_algorithm": "greedy"} if args.greedy else {})}
    if args.stretch:
        recipe["preprocess"] = {key: value for key, value in recipe["preprocess"].items()
                                if key not in ("letterbox", "letterbox_fill")}
    recipe["verify"]["count"] = len(list_images(coco / "val2017"))
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    untuned_copies(path, args.tune_steps)
    verdict, variants = built_as_written(path, ["--out", str(work / "dist"), "--build-dir", str(work / "build")],
                                         npu=True)
    print(f"{args.member} ({args.package}): init's recipe, labels and score threshold added"
          f"{', NMS greedy' if args.greedy else ''}{', stretched' if args.stretch else ''}, built: {verdict}")
    post = recipe["postprocess"]  # a head without keypoints is not cut: its two outputs are the model's
    outputs = recipe.get("strip", {}).get("outputs") or [post["box_output"], post["class_output"]]
    print(f"| variant | kernels | matched with float32 | {' | '.join(f'{name} SQNR' for name in outputs)} |")
    print("| --- " * (3 + len(outputs)) + "|")
    for name, entry in variants.items():
        check = entry.get("verify", {})
        matched = f"{matched_share_text(check)}, of {check['detections_compared']}" \
            if "matched_detections" in check else "-"
        sqnr = " | ".join(f"{check[output]['sqnr_db']:.1f} dB" if output in check else "-" for output in outputs)
        print(f"| {name} | {check.get('kernels', '-')} | {matched} | {sqnr} |")
    for line in tuning_lines(variants):
        print(line)
    print(f"(work folder: {work})")


if __name__ == "__main__":
    main()
