"""Classification labels from every layout a user's folder can have, matched to the recipe's labels.

The same images must get the same labels (and a model the same top-1) whether their class is in the
file name, in a folder per class, or in a labels file; a label that fits nothing is an error, not 0 %.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mzconvert.errors import MzError, RecipeError
from mzconvert.fsio import sha256_file
from mzconvert.imagenet import imagenet_synsets
from mzconvert.recipe import ClassLabels, parse_recipe
from mzconvert.tasks.classification import class_offset, labelled_images
from tests.conftest import run_cli
from tests.test_onnx_backend import recipe_text, tiny_onnx

ANIMALS = ClassLabels(names=("cat", "dog", "bird"), label_offset=0)


def _image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def _by_content(labelled) -> dict[str, int]:
    return {sha256_file(path): label for path, label in labelled.images}


def test_imagenet_synsets_are_the_1000_sorted_classes():
    synsets = imagenet_synsets()
    assert len(synsets) == len(set(synsets)) == 1000 and list(synsets) == sorted(synsets)
    assert synsets[0] == "n01440764" and synsets[-1] == "n15075141"


def test_three_layouts_of_the_same_images_give_the_same_labels(tmp_path):
    flat, per_class = tmp_path / "flat", tmp_path / "per-class"
    names = {"n01440764": "tench", "n01443537": "goldfish", "n15075141": "toilet tissue"}
    for seed, synset in enumerate(names):
        _image(flat / f"{synset}_{seed}.JPEG", seed)
        shutil.copy(flat / f"{synset}_{seed}.JPEG", _image(per_class / synset / "x.jpg", 99).parent / f"{seed}.jpg")
        (per_class / synset / "x.jpg").unlink()
    lines = "".join(f"{p.name}\t{names[p.name.split('_')[0]]}\n" for p in sorted(flat.iterdir()))
    (tmp_path / "labels.txt").write_text("# file label\n" + lines)
    labels = ClassLabels(names=imagenet_synsets(), label_offset=0)
    by_name = labelled_images(flat, labels)
    by_folder = labelled_images(per_class, labels)
    by_file = labelled_images(flat, labels, tmp_path / "labels.txt")
    assert _by_content(by_name) == _by_content(by_folder) == _by_content(by_file)
    assert sorted(_by_content(by_name).values()) == [0, 1, 999]
    assert by_name.source == "ImageNet synsets in the file names"
    assert by_folder.source == "one folder per class (3 folders)"
    assert by_file.source == "labels file labels.txt"


def test_synsets_find_labels_that_are_imagenet_class_names(tmp_path):
    """A published classifier's own labels are class names (Google's: 'background', 'tench, Tinca tinca', ...; or
    short ones, 'tench'); ImageNet folders are named by synset. Labels that are ImageNet's 1000 classes in order
    (after a background label or not) answer by position, the two classes named 'crane' too; other labels by the
    whole name, or by a first name no other class has: 'crane' (a bird and a machine) then by neither synset."""
    from mzconvert.imagenet import imagenet_classes

    _image(tmp_path / "data" / "n01440764" / "a.JPEG", 0)
    _image(tmp_path / "data" / "n01443537" / "b.JPEG", 1)
    _image(tmp_path / "data" / "n02012849" / "bird.JPEG", 2)  # crane, the bird
    _image(tmp_path / "data" / "n03126707" / "machine.JPEG", 3)  # crane, the machine
    whole = tuple(names for _, names in imagenet_classes())
    for names, offset in ((("background",) + whole, 1), (tuple(n.split(", ")[0] for n in whole), 0)):
        found = {path.name: label for path, label in labelled_images(tmp_path / "data", ClassLabels(names, 0)).images}
        assert found == {"a.JPEG": offset, "b.JPEG": offset + 1, "bird.JPEG": offset + 134,
                         "machine.JPEG": offset + 517}, found
    some = ClassLabels(names=("goldfish, Carassius auratus", "tench", "crane"), label_offset=0)
    (tmp_path / "data" / "n02012849" / "bird.JPEG").unlink()
    (tmp_path / "data" / "n03126707" / "machine.JPEG").unlink()
    assert sorted(label for _, label in labelled_images(tmp_path / "data", some).images) == [0, 1]
    _image(tmp_path / "cranes" / "n02012849_bird.JPEG", 2)
    with pytest.raises(MzError, match=r"label 'n02012849' is not one of the recipe's 3 labels"):
        labelled_images(tmp_path / "cranes", some)


def test_class_name_folders_and_index_labels(tmp_path):
    for i, name in enumerate(("Dog", "bird")):  # case does not matter
        _image(tmp_path / "data" / name / "a.png", i)
    assert sorted(label for _, label in labelled_images(tmp_path / "data", ANIMALS).images) == [1, 2]
    (tmp_path / "idx.txt").write_text("Dog/a.png 0\nbird/a.png 2\n")
    assert [label for _, label in labelled_images(tmp_path / "data", ANIMALS, tmp_path / "idx.txt").images] == [0, 2]


def test_unknown_label_and_unlabelled_folder_are_named_errors(tmp_path):
    _image(tmp_path / "data" / "horse" / "a.png", 0)
    with pytest.raises(MzError, match=r"horse: label 'horse' is not one of the recipe's 3 labels \(cat, dog, bird"):
        labelled_images(tmp_path / "data", ANIMALS)
    _image(tmp_path / "flat" / "IMG_0001.jpg", 1)
    with pytest.raises(MzError, match="IMG_0001.jpg: cannot tell this image's label"):
        labelled_images(tmp_path / "flat", ANIMALS)
    (tmp_path / "bad.txt").write_text("IMG_0001.jpg\n")
    with pytest.raises(MzError, match=r"bad.txt:1: expected 'file label'"):
        labelled_images(tmp_path / "flat", ANIMALS, tmp_path / "bad.txt")


def test_class_count_must_fit_labels_and_offset():
    background_first = ClassLabels(names=imagenet_synsets(), label_offset=1)
    assert class_offset(1001, background_first, "m") == 1
    with pytest.raises(MzError, match="m: scores 2 classes, but the recipe declares 3 labels with label_offset 0"):
        class_offset(2, ANIMALS, "m")


def test_labels_from_a_file_beside_the_recipe_and_only_for_classifiers(tmp_path):
    (tmp_path / "names.txt").write_text("cat\ndog\n\nbird\n")
    text = recipe_text(tiny_onnx(tmp_path / "m.onnx")) + "labels: names.txt\nlabel_offset: 1\n"
    recipe = parse_recipe(tmp_path / "r.yaml", text)
    assert recipe.labels == ClassLabels(names=("cat", "dog", "bird"), label_offset=1)
    with pytest.raises(RecipeError, match="r.yaml: labels: cannot read labels file"):
        parse_recipe(tmp_path / "r.yaml", text.replace("names.txt", "missing.txt"))


@pytest.mark.slow
def test_eval_top1_is_the_same_for_every_layout_and_kept_per_dataset(tmp_path, mirror):
    """A 10-class classifier labelled with 10 real synsets, evaluated on real ImageNet samples in two layouts."""
    samples = sorted((mirror / "imagenet-samples").glob("*.JPEG"))[:10]
    synsets = [p.name.split("_")[0] for p in samples]
    (tmp_path / "synsets.txt").write_text("\n".join(synsets) + "\n")
    recipe = tmp_path / "tiny-onnx.yaml"
    recipe.write_text(recipe_text(tiny_onnx(tmp_path / "m.onnx")) + "labels: synsets.txt\n")
    flat, per_class = tmp_path / "flat", tmp_path / "per-class"
    flat.mkdir()
    for path, synset in zip(samples, synsets):
        shutil.copy(path, flat / path.name)
        (per_class / synset).mkdir(parents=True)
        shutil.copy(path, per_class / synset / "image.jpg")
    common = ["--quiet", "--json", "--mirror", str(mirror), "--cache-dir", str(tmp_path / "cache")]
    dirs = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    assert run_cli(*common, "build", str(recipe), *dirs).returncode == 0
    results = []
    for folder in (flat, per_class):
        done = run_cli(*common, "eval", str(recipe), "--dataset", str(folder), *dirs)
        assert done.returncode == 0, done.stderr[-2000:]
        results.append(json.loads(done.stdout))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()  # no --out/--build-dir, another working folder: the build is found where it was written
    done = run_cli(*common, "eval", str(recipe), "--dataset", str(flat), cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-2000:]
    results.append(json.loads(done.stdout))
    assert results[0]["results"] == results[1]["results"] == results[2]["results"]
    rows = results[0]["results"]
    assert {"source-graph", "float32", "int8", "int8 (fused kernels)"} <= set(rows)
    assert rows["float32"]["top1_agreement"] == 1.0
    # the ONNX int8 as its ops define it, and as ONNX Runtime's fused integer kernels compute it on this CPU
    assert (rows["int8"]["kernels"], rows["int8 (fused kernels)"]["kernels"]) == ("defined", "fused")
    assert rows["int8 (fused kernels)"]["difference"]["to"] == "int8"
    assert results[1]["labels"] == "one folder per class (10 folders)"
    shown = run_cli(*common, "predict", str(recipe), str(samples[0]), "--to", str(tmp_path / "pictures"), *dirs)
    assert shown.returncode == 0, shown.stderr[-2000:]
    from PIL import Image

    picture = Image.open(tmp_path / "pictures" / f"{samples[0].stem}.png")
    assert picture.width >= 4 * 480  # float32, float16, dynamic and int8 side by side
    kept = sorted(p.name for p in (tmp_path / "dist" / "tiny-onnx" / "eval").iterdir())
    assert len(kept) == 2 and kept[0].startswith("flat-") and kept[1].startswith("per-class-")  # flat: once


@pytest.mark.parametrize("carrier", ["archive labels file", "onnx metadata", "tflite associated file"])
def test_init_proposes_the_labels_the_source_carries(tmp_path, carrier):
    """Class names travel with models three ways: a labels file beside the model in its archive, an exporter's
    metadata (Ultralytics writes names into ONNX metadata_props), a TFLite model's associated files (a zip
    appended to the flatbuffer). init writes them into the recipe when there is one name per class."""
    import zipfile

    import onnx

    names = ["cat", "dog", "fox", "owl", "elk"]
    model = tiny_onnx(tmp_path / "model.onnx", classes=5)
    source = model
    if carrier == "archive labels file":
        source = tmp_path / "release.zip"
        with zipfile.ZipFile(source, "w") as archive:
            archive.write(model, "release/model.onnx")
            archive.writestr("release/labels.txt", "\n".join(names) + "\n")
            archive.writestr("release/README.txt", "not labels\n")
    elif carrier == "onnx metadata":
        proto = onnx.load(str(model))
        proto.metadata_props.add(key="names", value=str(dict(enumerate(names))))
        onnx.save(proto, str(model))
    else:
        from tests.test_tflite_source import float_tflite

        source = float_tflite(tmp_path / "model.tflite")
        with zipfile.ZipFile(source, "a") as appended:
            appended.writestr("labelmap.txt", "\n".join(names))
    inspected = run_cli("inspect", str(source), *(["--member", "release/model.onnx"] if carrier.startswith("archive")
                                                   else []))
    shown = "metadata names" if carrier == "onnx metadata" else "label file"
    assert inspected.returncode == 0 and shown in inspected.stdout, inspected.stdout + inspected.stderr
    made = run_cli("init", "carried", "--from", str(source), "--to", str(tmp_path))
    assert made.returncode == 0, made.stderr
    recipe = __import__("yaml").safe_load((tmp_path / "carried.yaml").read_text())
    assert recipe["labels"] == names
    parse_recipe(tmp_path / "carried.yaml", (tmp_path / "carried.yaml").read_text())
