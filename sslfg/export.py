"""A pretraining run's backbone as a Hugging Face-format folder: timm's own `save_for_hf` (config.json with the
run's preprocessing as pretrained_cfg, model.safetensors), a generated model card (README.md) and, on request, an
ONNX graph checked against the torch backbone with onnxruntime.

Called by `sslfg.commands.export` (`python -m eval.export`, `sslfg-export`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models._hub import save_for_hf

from sslfg.config import ConfigError
from sslfg.engine.rundir import RUN_CONFIG, check_output_dir, read_run_file
from sslfg.weights import BACKBONE_META, backbone_meta, load_backbone

ONNX_FILE = "model.onnx"
ONNX_TOLERANCE = 1e-4  # largest |onnxruntime - torch| accepted on the check batch
ONNX_BATCH = 4
EVAL_DIR = "eval"  # where the frozen-feature evaluations of a run directory write <command>.json


def check_target(out: Path) -> None:
    """ConfigError unless `out` is new or an empty folder: the export never writes into a folder it did not make
    (nor one `check_output_dir` refuses)."""
    check_output_dir(out, "--out", example="--out exports/my_model")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: '{out}' exists and is not an empty folder; give a new folder (the export never "
                          "writes into one it did not create)")


def onnx_modules() -> tuple[Any, Any]:
    """(onnx, onnxruntime), or a ConfigError naming the extra that installs them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ConfigError(f"--onnx needs the packages onnx and onnxruntime ({e.name} is not installed); install "
                          "them with `pip install 'sslfg[onnx]'` (or `pip install -e '.[onnx]'` in the repository)"
                          ) from e
    return onnx, onnxruntime


def run_backbone(run_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The run's backbone, whose pretrained_cfg holds the run's preprocessing, and its timm kwargs (backbone.json);
    a ConfigError unless it is a pretraining run (a fine-tuning run's config has no method, which the card names)."""
    model = load_backbone(run_dir)  # first: its errors name a folder that is not a finished run
    if "method" not in run_recipe(run_dir):
        raise ConfigError(f"--checkpoint: '{run_dir}' is a fine-tuning run (its {RUN_CONFIG} has no method), and "
                          "eval.export shares a pretraining run's backbone; give the pretraining run (the fine-tuning "
                          "run's `init`)")
    meta = backbone_meta(run_dir)
    if "pretrained_cfg" not in meta:
        raise ConfigError(f"--checkpoint: {run_dir / BACKBONE_META} was written before sslfg recorded the run's "
                          "preprocessing; export the backbone again by finishing the run with this version "
                          f"(`python train_ssl.py --config {run_dir / RUN_CONFIG} resume=auto`)")
    return model, meta["kwargs"]


def run_recipe(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml, with what the model card reads."""
    return read_run_file(run_dir / RUN_CONFIG, "write it again from the recipe the run was started with",
                         ("model", "data", "train"))


def export_run(run_dir: Path, out: Path, onnx: bool = False, check: bool = False) -> dict[str, Any]:
    """Writes the folder `out` (created whole at the end, never partly); returns what it holds. `check` builds and
    validates everything and writes nothing."""
    run_dir, out = Path(run_dir), Path(out)
    check_target(out)
    if onnx:
        onnx_modules()
    model, kwargs = run_backbone(run_dir)
    report: dict[str, Any] = {"run": str(run_dir), "out": str(out), "architecture": model.pretrained_cfg.get(
        "architecture"), "input_size": model.pretrained_cfg["input_size"], "onnx": onnx}
    if check:
        return report
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        folder = Path(tmp) / out.name
        # model_args: the geometry (image and patch size, width, depth) that timm builds the architecture with
        save_for_hf(model, str(folder), model_args=kwargs, safe_serialization=True)
        if onnx:
            report["onnx.max_abs_diff"] = export_onnx(model, folder / ONNX_FILE)
        shutil.copyfile(run_dir / RUN_CONFIG, folder / "sslfg_config.yaml")
        (folder / "README.md").write_text(model_card(run_dir, out, model.pretrained_cfg, report))
        if out.exists():  # an empty folder (check_target)
            out.rmdir()
        folder.rename(out)
    return report


def export_onnx(model: torch.nn.Module, path: Path) -> float:
    """Writes the backbone (dynamic batch) with torch's TorchScript-based exporter, which needs no onnxscript and
    reads timm models under every timm version; the largest |onnxruntime - torch| on a random batch, a ConfigError
    above ONNX_TOLERANCE."""
    _, onnxruntime = onnx_modules()
    x = torch.randn(ONNX_BATCH, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():  # the tracer's notes on timm's shape asserts, and the exporter's deprecation
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, input_names=["image"],
                          output_names=["features"], dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    diff = float(np.abs(session.run(None, {"image": x.numpy()})[0] - expected).max())
    if diff > ONNX_TOLERANCE:
        raise ConfigError(f"--onnx: onnxruntime's output differs from the torch backbone by {diff:.2g} "
                          f"(> {ONNX_TOLERANCE}); the {type(model).__name__} graph does not export faithfully")
    return diff


def evaluation_numbers(run_dir: Path) -> dict[str, dict[str, float]]:
    """Each <run>/eval/<command>.json's metrics: the keys after the protocol.* block (`sslfg.evaluation.run.record`
    writes what produced the numbers first, then the protocol, then the metrics)."""
    numbers = {}
    for path in sorted((run_dir / EVAL_DIR).glob("*.json")):
        data = read_run_file(path, "run the evaluation again, or move the file away (the card leaves it out)")
        metrics, seen_protocol = {}, False
        for key, value in data.items():
            seen_protocol |= key.startswith("protocol.")
            if seen_protocol and not key.startswith("protocol.") and isinstance(value, float):
                metrics[key] = value
        numbers[path.stem] = metrics
    return numbers


def model_card(run_dir: Path, out: Path, pretrained_cfg: dict[str, Any], report: dict[str, Any]) -> str:
    """README.md of the folder: what was trained on what for how long, the run's evaluations, how to load and push."""
    cfg = run_recipe(run_dir)
    summary_path = run_dir / "summary.json"
    summary = read_run_file(summary_path, "remove it (the card then leaves its figures out)") \
        if summary_path.is_file() else {}
    method, model, data, train = cfg["method"], cfg["model"], cfg["data"], cfg["train"]
    local = method.get("local", {}).get("weight", 0)
    lines = [
        "---", "library_name: timm", "tags: [image-feature-extraction, timm, sslfg, self-supervised]", "---", "",
        f"# {out.name}", "",
        f"A {pretrained_cfg.get('architecture', model['name'])} backbone (no classifier) pretrained by "
        f"self-supervision with sslfg, exported with timm's `save_for_hf`.", "",
        "## Recipe", "",
        f"- method: {method['name']}" + (f" with LoDisc's local branch (weight {local})" if local else ""),
        f"- backbone: `{model['name']}` with {json.dumps(model.get('kwargs') or {})}, patch size "
        f"{model.get('patch_size') or 'timm default'}, init {summary.get('init', model.get('weights') or 'scratch')}",
        f"- data: `{data['root']}` ({data['format']}, split {data['train_split']}, "
        f"{summary.get('data.train.images', '?')} images), {data['image_size']} px",
        f"- budget: {summary.get('step', '?')} of {summary.get('total_steps', '?')} optimizer steps "
        f"({train['epochs']} epochs), global batch {summary.get('global_batch', '?')}, "
        f"peak lr {summary.get('lr', '?')}",
        "- the full resolved recipe: `sslfg_config.yaml`", "",
        "## Preprocessing", "",
        f"Resize the short side to {pretrained_cfg['input_size'][1]}/{pretrained_cfg['crop_pct']} "
        f"({pretrained_cfg['interpolation']}), centre-crop {pretrained_cfg['input_size'][1]} px, normalise with "
        f"mean {pretrained_cfg['mean']} and std {pretrained_cfg['std']}: `config.json`'s pretrained_cfg, which "
        "`timm.data.resolve_data_config` reads.", "",
        "## Evaluation", "",
    ]
    numbers = evaluation_numbers(run_dir)
    lines += [f"- {command}: " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in metrics.items())
              for command, metrics in numbers.items()] or ["No evaluation of the run (eval/*.json) was found."]
    lines += [
        "", "## Use", "", "```python", "import timm", "",
        f'model = timm.create_model("local-dir:{out.name}", pretrained=True).eval()  # or "hf-hub:ORG/{out.name}"',
        "config = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**config)",
        "features = model(transform(image).unsqueeze(0))  # (1, num_features)", "```", "",
    ]
    if report["onnx"]:
        lines += [f"`{ONNX_FILE}` is the same backbone as an ONNX graph (input `image` (batch, "
                  f"{', '.join(map(str, pretrained_cfg['input_size']))}), output `features`); onnxruntime "
                  f"matched torch within {report['onnx.max_abs_diff']:.1g} at export.", ""]
    lines += [
        "## Push to the Hugging Face hub", "", "```python", "from huggingface_hub import create_repo, upload_folder",
        "", f'create_repo("ORG/{out.name}", exist_ok=True)',
        f'upload_folder(repo_id="ORG/{out.name}", folder_path="{out.name}")', "```", "",
    ]
    return "\n".join(lines)
