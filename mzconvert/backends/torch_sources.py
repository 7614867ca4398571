"""PyTorch sources, exported to ONNX at freeze (the onnx backend converts them from there):
- `format: torch`: a state dict (loaded weights-only) for one of torch_models' modules, or for the user's own
  nn.Module class named in the recipe (`torch.module: file.py:Class`: their code, which naming it opts into);
- `format: torchscript`: a TorchScript archive (torch.jit.save): TorchScript code and tensors, no Python;
- `format: torch-export`: a torch.export archive (.pt2, torch.export.save), refused when it holds a pickled
  payload (torch.export.load would unpickle it: run code).
Every export is checked against the module it came from: ONNX Runtime must reproduce each output.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np

from ..errors import EXIT_BAD_INPUT, MzError, short_text
from ..recipe import Recipe, TorchSpec
from ..runtime import OnnxRunner
from . import nhwc_port

EXPORT_TOLERANCE = 1e-3  # max abs error of the ONNX export against the module, relative to outputs >= 1


def _torch(what: str = "PyTorch sources"):
    try:
        import torch
    except ImportError:
        raise MzError(f"{what} needs PyTorch: pip install 'mzconvert[torch]' (torch==2.13.0, the CPU build)"
                      ) from None
    return torch


def user_code(spec: TorchSpec | None, base: Path) -> Path | None:
    """The Python file of the user's own module class (`torch.module: file.py:Class`), from folder `base`."""
    if spec is None or not spec.user_class:
        return None
    path = spec.module.rpartition(":")[0]
    return (base / path).resolve() if path.endswith(".py") else None


def export_onnx(source: Path, recipe: Recipe, target: Path) -> None:
    """The source's module exported to ONNX at `target` (at input.shape), checked against the module; for our
    own modules with TFLite variants, their Keras port beside it."""
    _torch(f"{recipe.path}: format {recipe.format}")
    module = load_module(source, recipe.format, recipe.torch, recipe.path.parent, recipe.input.height_width,
                         lambda key: f"{recipe.path}: torch.{key}")
    output_names = list(recipe.strip.outputs) if recipe.strip else []
    if recipe.postprocess is not None and recipe.postprocess.anchors_tensor:
        output_names.append(recipe.postprocess.anchors_tensor)  # SSD modules also return their anchors
    example, expected = export_module(module, source, recipe.format, recipe.input.shape, recipe.input.name,
                                      output_names, recipe.torch.opset, target)
    if recipe.format == "torch" and not recipe.torch.user_class and any(v.target == "tflite" for v in recipe.variants):
        nhwc_port.write_keras_port(module, example, expected[0], target.with_name(nhwc_port.KERAS_PORT))


def export_module(module, source: Path, fmt: str, shape: tuple[int, ...], input_name: str, output_names: list[str],
                  opset: int, target: Path):
    """(example input, the module's outputs on it): `module` exported to ONNX at `target`, checked."""
    torch = _torch()
    example = torch.from_numpy(np.random.RandomState(0).normal(0, 1, shape).astype(np.float32))
    # PRESERVE: a torch.export module refuses to be switched to eval (it was exported in its eval state)
    mode = torch.onnx.TrainingMode.PRESERVE if fmt == "torch-export" else torch.onnx.TrainingMode.EVAL
    try:
        with warnings.catch_warnings():  # the exporter's advice on tracing is for the module's author
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(target), input_names=[input_name],
                              output_names=output_names or None, opset_version=opset, dynamo=False, training=mode)
    except Exception as exc:  # the exporter raises for unsupported ops, shapes the module refuses...
        raise MzError(f"{source}: PyTorch's ONNX export of the module failed at input shape {list(shape)}: "
                      f"{short_text(exc)}") from None
    with torch.no_grad():
        expected = module(example)
    expected = [t.numpy() for t in (expected if isinstance(expected, (tuple, list)) else (expected,))]
    got = OnnxRunner(target, output_names or None).run(example.numpy())
    errors = [float(np.max(np.abs(g.reshape(e.shape) - e))) / max(1.0, float(np.max(np.abs(e))))
              for g, e in zip(got, expected)]
    if len(got) != len(expected) or max(errors) > EXPORT_TOLERANCE:
        raise MzError(f"{target}: the ONNX export differs from the PyTorch module (max relative error "
                      f"{max(errors):.3g}, {len(got)} outputs for the module's {len(expected)})")
    return example, expected


def load_module(source: Path, fmt: str, spec: TorchSpec, base: Path, image_size: tuple[int, int],
                where=lambda key: f"torch.{key}"):
    """The module a PyTorch source holds, in eval mode (`base`: the folder a user's module file is named from;
    `where(key)`: what names the torch section's field in errors)."""
    torch = _torch()
    if fmt == "torchscript":
        try:
            module = torch.jit.load(str(source), map_location="cpu")
        except Exception as exc:  # RuntimeError for what is not a TorchScript archive
            raise MzError(f"{source}: not a TorchScript archive (torch.jit.save): {short_text(exc)}",
                          EXIT_BAD_INPUT) from None
        return module.eval()
    if fmt == "torch-export":
        _check_no_pickle(source)
        try:
            return torch.export.load(str(source)).module()
        except Exception as exc:  # the loader raises its own errors for other files
            raise MzError(f"{source}: not a torch.export archive (.pt2): {short_text(exc)}", EXIT_BAD_INPUT) from None
    from .torch_models import load_state

    module = _module_class(spec, base, image_size, where)
    state = load_state(source)
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        raise MzError(f"{source}: not a state dict for {spec.module}: {short_text(exc)}", EXIT_BAD_INPUT) from None
    return module.eval()


def _module_class(spec: TorchSpec, base: Path, image_size: tuple[int, int], where):
    """An instance of the recipe's module: ours with its options, or the user's class with its kwargs."""
    if not spec.user_class:
        from .torch_models import MODULES

        options = {"num_classes": spec.num_classes, "width": spec.width}
        if spec.module == "mobilenet_v1":
            options["relu6"] = spec.relu6
        if spec.module == "mobiledet_edgetpu_ssdlite":
            options["image_size"] = image_size[0]
        return MODULES[spec.module](**options)
    path, _, name = spec.module.rpartition(":")
    try:
        if (code := user_code(spec, base)) is not None:
            if not code.is_file():
                raise MzError(f"{where('module')}: no file {code}", EXIT_BAD_INPUT)
            loader = importlib.util.spec_from_file_location(f"mzconvert_user.{code.stem}", code)
            python_module = importlib.util.module_from_spec(loader)
            sys.modules[loader.name] = python_module
            loader.loader.exec_module(python_module)
        else:
            python_module = importlib.import_module(path)
        cls = getattr(python_module, name)
    except MzError:
        raise
    except Exception as exc:  # the user's code raises whatever it raises: say where
        raise MzError(f"{where('module')}: cannot load {spec.module}: {exc.__class__.__name__}: {short_text(exc)}",
                      EXIT_BAD_INPUT) from None
    torch = _torch()
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise MzError(f"{where('module')}: {spec.module} is not a torch.nn.Module class", EXIT_BAD_INPUT)
    try:
        return cls(**spec.kwargs)
    except Exception as exc:
        raise MzError(f"{where('kwargs')}: {name}({', '.join(spec.kwargs)}) failed: "
                      f"{exc.__class__.__name__}: {short_text(exc)}", EXIT_BAD_INPUT) from None


def _check_no_pickle(source: Path) -> None:
    """A .pt2 whose weights and constants are raw tensors, and whose sample inputs load weights-only: what
    torch.export.load then reads without unpickling anything."""
    torch = _torch()
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise MzError(f"{source}: not a torch.export archive (.pt2): {short_text(exc)}", EXIT_BAD_INPUT) from None
    with archive:
        for name in archive.namelist():
            if name.endswith(("model_weights_config.json", "model_constants_config.json")):
                config = json.loads(archive.read(name)).get("config", {})
                pickled = [key for key, meta in config.items()
                           if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(
                               ("weight_", "tensor_"))]
                if pickled:
                    raise MzError(f"{source}: refusing a .pt2 with pickled payloads ({', '.join(pickled[:3])}): "
                                  "loading it would run code", EXIT_BAD_INPUT)
            elif "/sample_inputs/" in name:
                import io

                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception as exc:
                    raise MzError(f"{source}: refusing a .pt2 whose sample inputs are not plain tensors ({name}: "
                                  f"{short_text(exc)}): loading it would run code", EXIT_BAD_INPUT) from None
