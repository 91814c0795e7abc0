"""Export a pretraining run's backbone as a Hugging Face-format folder that timm loads offline.

    python -m eval.export --checkpoint runs/sample_lodisc --out exports/sample_lodisc
    python -m eval.export --checkpoint runs/sample_lodisc --out exports/sample_lodisc_onnx --onnx

Writes --out (a new or empty folder, never one with files in it) with timm's `save_for_hf`: config.json (the
architecture and the run's preprocessing as pretrained_cfg: image size, mean, std, crop, interpolation) and
model.safetensors, plus README.md (a model card: recipe, data, budget, the run's eval/*.json numbers, how to load
and push it) and sslfg_config.yaml (the run's resolved recipe). `timm.create_model("local-dir:OUT", pretrained=True)`
loads it; `huggingface_hub.upload_folder` pushes it. --onnx adds model.onnx (torch.onnx's exporter, dynamic batch),
checked against the torch backbone with onnxruntime; it needs the onnx extra (`pip install 'sslfg[onnx]'`).
--check validates the run, the target folder and the extra, and writes nothing.
The console command `sslfg-export` takes the same arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sslfg.cli import command_parser
from sslfg.export import export_run


def main(argv: Sequence[str] | None = None) -> dict:
    parser = command_parser(__doc__)
    parser.add_argument("--checkpoint", metavar="RUN", required=True, help="finished sslfg pretraining run directory")
    parser.add_argument("--out", metavar="FOLDER", required=True, help="new (or empty) folder to write")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx (needs the onnx extra)")
    parser.add_argument("--check", action="store_true", help="validate and print what would be written; write nothing")
    args = parser.parse_args(argv)
    report = export_run(Path(args.checkpoint), Path(args.out), onnx=args.onnx, check=args.check)
    print("would write:" if args.check else "exported:")
    for key, value in report.items():
        print(f"  {key}: {value}")
    return report

