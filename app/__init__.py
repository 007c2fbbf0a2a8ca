"""The AgriCLIP demo app: a Gradio page for zero-shot classification of a photo (`app.demo`).

    python -m app --model runs/agriclip-demo/agriclip [--suite runs/agriclip-demo/data/suite.yaml]
    python -m app.space --model org/agriclip --suite suite.yaml --output my-space    # a Hub Space folder

The package sits on top of the inference layers (`agriclip`, `modeling_agriclip`); its command lines read the label
presets from a suite YAML (`evaluation.suite`) and import Gradio and torch only once their arguments are valid.
"""
