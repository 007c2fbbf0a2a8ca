"""Checkpoint conversion: parity with reference implementations and clear errors on bad files."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, ResNetConfig, ResNetModel, ViTConfig, ViTModel
from transformers.image_utils import PILImageResampling

from agriclip.cli import main as agriclip
from agriclip.errors import ExitCode
from modeling_agriclip import AgriCLIPModel
from modeling_agriclip.configuration_agriclip import AgriCLIPConfig
from modeling_agriclip.convert import convert, load_official_aligner


try:
    from transformers import CLIPImageProcessorPil as ImageProcessor
except ImportError:  # torchvision backend builds
    from transformers import CLIPImageProcessor as ImageProcessor


class TorchvisionBasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock, restated (torchvision does not import beside the CPU torch build)."""

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class TorchvisionResNet(nn.Module):
    """The official DINO ResNet layout: torchvision ResNet with `fc = Identity`, output = pooled features."""

    def __init__(self, widths=(8, 16, 24, 32), depths=(1, 2, 1, 1), stem=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        inplanes = stem
        for index, (width, depth) in enumerate(zip(widths, depths), start=1):
            blocks = []
            for block in range(depth):
                blocks.append(TorchvisionBasicBlock(inplanes, width, 2 if block == 0 and index > 1 else 1))
                inplanes = width
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
        self.fc = nn.Identity()

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _randomise_batchnorm(module):
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory, clip_tokenizer):
    """A tiny transformers CLIPModel with its processor, saved locally as a Hub checkpoint would be."""
    torch.manual_seed(1)
    tiny = AgriCLIPConfig.tiny()
    config = CLIPConfig(
        text_config=tiny.text_config.to_dict(), vision_config=tiny.vision_config.to_dict(), projection_dim=32
    )
    model = CLIPModel(config).eval()
    model.logit_scale.data.fill_(3.0)
    path = tmp_path_factory.mktemp("clip")
    image_processor = ImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, resample=PILImageResampling.BICUBIC
    )
    model.save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer).save_pretrained(path)
    return path, model


def test_clip_parity(clip_folder, tmp_path):
    path, reference = clip_folder
    model, processor = convert(tmp_path / "out", clip=str(path), preset="tiny")
    assert model.logit_scale.item() == pytest.approx(3.0)
    texts = processor(text=["a leaf with brown spots", "a grass carp"], return_tensors="pt")
    pixel_values = torch.randn(2, 3, 64, 64)
    # The AgriCLIP processor normalises with ImageNet statistics; feed the CLIP reference the same raw pixels
    # normalised with CLIP's own statistics.
    config = model.config
    raw = pixel_values * torch.tensor(config.image_std).view(1, 3, 1, 1) + torch.tensor(config.image_mean).view(
        1, 3, 1, 1
    )
    clip_pixels = (raw - torch.tensor(config.clip_image_mean).view(1, 3, 1, 1)) / torch.tensor(
        config.clip_image_std
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        expected_text = reference.get_text_features(**texts).pooler_output
        expected_image = reference.get_image_features(pixel_values=clip_pixels).pooler_output
        reloaded = AgriCLIPModel.from_pretrained(tmp_path / "out").eval()
        for candidate in (model, reloaded):
            assert (candidate.get_text_features(**texts).pooler_output - expected_text).abs().max() <= 1e-5
            clip_image = candidate.get_image_features(pixel_values, embedding="clip").pooler_output
            assert (clip_image - expected_image).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_backbone_parity(kind, tmp_path):
    torch.manual_seed(2)
    if kind == "vit":
        backbone = ViTModel(
            ViTConfig(
                image_size=64,
                patch_size=8,
                hidden_size=24,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=48,
            )
        )
    else:
        backbone = ResNetModel(ResNetConfig(depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8, layer_type="basic"))
    backbone.eval().save_pretrained(tmp_path / "backbone")
    model, _ = convert(clip=None, dino=str(tmp_path / "backbone"), preset="tiny")
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outputs = backbone(pixel_values=pixel_values)
        expected = outputs.last_hidden_state[:, 0] if kind == "vit" else outputs.pooler_output.flatten(1)
        torch.testing.assert_close(model.get_backbone_features(pixel_values).pooler_output, expected, rtol=0, atol=1e-6)


def test_official_release_reproduces_official_zero_shot(clip_folder, tmp_path):
    """Official computation: DINO ResNet features @ W.T + b, L2-normalised, cosine against CLIP text embeddings."""
    path, clip_reference = clip_folder
    torch.manual_seed(3)
    resnet = TorchvisionResNet()
    _randomise_batchnorm(resnet)
    resnet.eval()
    torch.save(resnet.state_dict(), tmp_path / "dino_pretrain.pth")
    weight, bias = torch.randn(32, 32), torch.randn(32)
    torch.save({"W": weight, "b": bias}, tmp_path / "aligner.pth")
    agriclip(
        [
            "convert",
            "--clip",
            str(path),
            "--official-dino",
            str(tmp_path / "dino_pretrain.pth"),
            "--official-aligner",
            str(tmp_path / "aligner.pth"),
            "--preset",
            "tiny",
            "--output",
            str(tmp_path / "official"),
        ]
    )
    model = AgriCLIPModel.from_pretrained(tmp_path / "official").eval()
    assert model.config.dino_config.depths == [1, 2, 1, 1]

    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tmp_path / "official")
    classes, prompts = ["boron", "iron", "zinc"], ["a photo contain {} deficiency", "a leaf with {} deficiency"]
    pixel_values = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        features = resnet(pixel_values)
        official_images = F.normalize(features @ weight.T + bias, dim=-1)
        class_weights = []
        for name in classes:
            tokens = processor(text=[p.format(name) for p in prompts], return_tensors="pt")
            class_weights.append(F.normalize(clip_reference.get_text_features(**tokens).pooler_output, dim=-1).mean(0))
        official_logits = official_images @ F.normalize(torch.stack(class_weights), dim=-1).T

        ours_images = F.normalize(model.get_image_features(pixel_values).pooler_output, dim=-1)
        ours_text = []
        for name in classes:
            tokens = processor(text=[p.format(name) for p in prompts], return_tensors="pt")
            ours_text.append(F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1).mean(0))
        ours_logits = ours_images @ F.normalize(torch.stack(ours_text), dim=-1).T
    torch.testing.assert_close(ours_images, official_images, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_logits, official_logits, rtol=0, atol=1e-5)
    assert torch.equal(ours_logits.argmax(1), official_logits.argmax(1))


class NotATensor:
    pass


def test_bad_official_files_are_refused_with_the_file_named(tmp_path):
    torch.save({"W": torch.randn(32, 16), "b": torch.randn(32)}, tmp_path / "wrong_shape.pth")
    with pytest.raises(ValueError, match=r"wrong_shape\.pth.*16 -> 32.*64 -> 32"):
        load_official_aligner(tmp_path / "wrong_shape.pth", in_features=64, out_features=32)
    torch.save({"W": torch.randn(32, 16)}, tmp_path / "no_bias.pth")
    with pytest.raises(ValueError, match=r"no_bias\.pth lacks.*'b'"):
        load_official_aligner(tmp_path / "no_bias.pth")
    torch.save({"W": torch.randn(32, 16), "b": torch.randn(8)}, tmp_path / "mismatched.pth")
    with pytest.raises(ValueError, match=r"mismatched\.pth: W must be"):
        load_official_aligner(tmp_path / "mismatched.pth")
    torch.save({"W": NotATensor(), "b": torch.randn(2)}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match=r"pickled\.pth holds pickled objects.*refusing"):
        load_official_aligner(tmp_path / "pickled.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "no_bias.pth").read_bytes()[:50])
    with pytest.raises(ValueError, match=r"truncated\.pth is not a readable torch file"):
        load_official_aligner(tmp_path / "truncated.pth")


def test_convert_rejects_mismatched_parts(tmp_path):
    torch.save({"W": torch.randn(32, 10), "b": torch.randn(32)}, tmp_path / "aligner.pth")
    with pytest.raises(ValueError, match=r"aligner\.pth.*10 -> 32.*48 -> 32"):
        convert(preset="tiny", official_aligner=tmp_path / "aligner.pth")
    torch.save({"layer1.0.conv1.weight": torch.randn(8, 8, 3, 3)}, tmp_path / "not_resnet.pth")
    with pytest.raises(ValueError, match=r"not_resnet\.pth: not a torchvision-layout ResNet"):
        convert(preset="tiny", official_dino=tmp_path / "not_resnet.pth")
    with pytest.raises(ValueError, match="unknown preset"):
        convert(preset="huge")


def test_agriclip_convert_reports_a_wrong_shaped_aligner_as_one_line_and_exit_9(tmp_path, capsys):
    torch.save({"W": torch.randn(32, 10), "b": torch.randn(32)}, tmp_path / "aligner.pth")
    code = agriclip(
        [
            "convert",
            "--preset",
            "tiny",
            "--official-aligner",
            str(tmp_path / "aligner.pth"),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == ExitCode.INPUT == 9
    assert capsys.readouterr().err.splitlines() == [
        f"agriclip: error: {tmp_path / 'aligner.pth'}: the aligner maps 10 -> 32 features, but the model needs 48 -> 32 "
        "(backbone features -> projection_dim)"
    ]
    assert not (tmp_path / "out").exists()


def test_agriclip_convert_names_a_clip_folder_without_config(tmp_path, capsys):
    (tmp_path / "clip").mkdir()
    code = agriclip(
        ["convert", "--preset", "tiny", "--clip", str(tmp_path / "clip"), "--output", str(tmp_path / "out")]
    )
    assert code == ExitCode.INPUT
    assert capsys.readouterr().err.splitlines() == [
        f"agriclip: error: {tmp_path / 'clip'} has no config.json: not a saved model folder (save it with "
        "save_pretrained, or build one with `agriclip convert`)"
    ]
