"""Does the exported ONNX classifier predict what the PyTorch model predicts? Per task of an evaluation suite.

For each classification dataset of `--suite` (by default the embedded downstream tasks the demo writes), the model
is exported by `modeling_agriclip.export.export_classifier` for the dataset's class names and templates, fp32 and
int8, and every test image is classified three ways: `ZeroShotClassifier` (PyTorch), the exported runner on
model.onnx and on model.int8.onnx. Prints per task: images, chance (1 / classes), PyTorch top-1, images where the
fp32 top-1 differs from PyTorch's, the largest absolute probability difference, the int8 top-1 agreement with
PyTorch and the int8 top-1, then the model file sizes. Targets: fp32 identical top-1 on every image and probability
difference <= 1e-4; int8 agreement >= 98 % and accuracy within 1 point.

    python -m bench.export_parity --model runs/agriclip-demo/agriclip [--suite runs/agriclip-demo/data/suite.yaml]
"""

import argparse
import importlib.util
import tempfile
from pathlib import Path

import numpy as np

from agriclip.images import open_image
from agriclip.sources import load_labelled_dataset
from evaluation.suite import load_suite_config
from modeling_agriclip.export import INT8_MODEL, export_classifier
from modeling_agriclip.zero_shot import ZeroShotClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="AgriCLIP folder (the demo's: <output_dir>/agriclip).")
    parser.add_argument("--suite", default=None, help="Suite YAML (default: <model>/../data/suite.yaml).")
    parser.add_argument("--embedding", default=None, help="Image embedding (default: the checkpoint's).")
    args = parser.parse_args()
    suite = load_suite_config(args.suite or Path(args.model).parent / "data" / "suite.yaml")
    classifier = ZeroShotClassifier.from_pretrained(args.model, embedding=args.embedding)

    print(f"model {args.model}, embedding {args.embedding or classifier.model.config.image_embedding}")
    print("task                 images  chance  pytorch  fp32 top-1 differs  max |dp|   int8 agrees  int8 top-1")
    totals = {"images": 0, "differs": 0, "agrees": 0, "max_diff": 0.0}
    with tempfile.TemporaryDirectory() as workdir:
        for spec in suite.datasets:
            dataset, classes = load_labelled_dataset(spec.path, spec.split)
            names = spec.prompt_names(classes, spec.name)
            export = export_classifier(classifier, names, spec.templates, Path(workdir) / spec.name, quantize="int8")
            loader = importlib.util.spec_from_file_location(f"runner_{spec.name}", export.folder / "runner.py")
            runner = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(runner)
            images = [open_image(image) for image in dataset["image"]]
            labels = np.asarray(dataset["label"])
            expected = classifier.logits(images, names, spec.templates).softmax(-1).numpy()
            onnx = runner.Classifier(export.folder)
            pixels = np.stack([runner.preprocess(image, onnx.spec) for image in images])
            fp32 = onnx.probabilities(pixels)
            int8 = runner.Classifier(export.folder, model=INT8_MODEL).probabilities(pixels)
            differs = int((fp32.argmax(1) != expected.argmax(1)).sum())
            max_diff = float(np.abs(fp32 - expected).max())
            agrees = int((int8.argmax(1) == expected.argmax(1)).sum())
            print(
                f"{spec.name:20s} {len(images):6d}  {1 / len(names):6.3f}  {(expected.argmax(1) == labels).mean():7.3f}"
                f"  {differs:18d}  {max_diff:9.2e}  {agrees / len(images):11.3f}  {(int8.argmax(1) == labels).mean():10.3f}"
            )
            totals["images"] += len(images)
            totals["differs"] += differs
            totals["agrees"] += agrees
            totals["max_diff"] = max(totals["max_diff"], max_diff)
        sizes = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in export.sizes.items())
    print(
        f"all {totals['images']} images: fp32 top-1 differs on {totals['differs']}, max |dp| {totals['max_diff']:.2e}; "
        f"int8 agrees on {totals['agrees'] / totals['images']:.3f}; model files {sizes}"
    )


if __name__ == "__main__":
    main()
