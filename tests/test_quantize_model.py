"""``quantize_model``: any timm model, in place, SQ masks drawn every step.

    sq = quantize_model(model, QuantConfig("twn"))
    sq.draw_masks(); loss = model(x).sum(); loss.backward(); sq.advance("step")

The layers keep their parameters, names and the model its class and
``state_dict`` keys; only the forward now uses the hybrid weight
``W~_i = Q_i`` (selected rows) or ``W_i`` (the others).
"""
import copy
import io

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import sqdist
from sqdist import QuantConfig, SQConfig, quantize_model
from sqdist.dist import pack_bits, unpack_bits
from sqdist.nn import SQLayer

HALF = SQConfig(ratios=(0.5,))

MODELS = {  # name -> (timm kwargs, stem, classifier)
    "resnet18": ({}, "conv1", "fc"),
    "resnet50": ({}, "conv1", "fc"),
    "mobilenetv3_small_100": ({}, "conv_stem", "classifier"),
    "vit_tiny_patch16_224": ({"img_size": 32}, "patch_embed.proj", "head"),
}


def timm_model(name: str) -> nn.Module:
    kwargs, _, _ = MODELS[name]
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def small_timm_model() -> nn.Module:
    """timm's tiny test ResNet (0.4M parameters) for tests that run many steps."""
    return timm.create_model("test_resnet", pretrained=False, num_classes=10)


def rows(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


@pytest.mark.parametrize("name", list(MODELS))
def test_timm_model_trains_with_sq_masks(name):
    model = timm_model(name)
    cls, keys = type(model), list(model.state_dict())
    sq = quantize_model(model, QuantConfig("twn", sq=HALF))
    _, stem, classifier = MODELS[name]

    assert type(model) is cls and list(model.state_dict()) == keys
    assert stem not in sq.layers and classifier not in sq.layers
    assert not isinstance(model.get_submodule(stem), SQLayer)
    assert not isinstance(model.get_submodule(classifier), SQLayer)
    assert len(sq.layers) >= 10

    model.train()
    sq.draw_masks()
    for layer in sq.layers.values():  # exactly round(0.5 m) rows of each layer quantized
        assert layer.sq_mask.shape == (layer.weight.shape[0],)
        assert int(layer.sq_mask.sum()) == round(0.5 * layer.weight.shape[0])
    model(torch.randn(2, 3, 32, 32)).logsumexp(dim=1).mean().backward()
    for layer_name, layer in sq.layers.items():
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all(), layer_name
    assert set(sq.last_errors) == set(sq.layers)
    assert all(0 < e < 1 for e in sq.last_errors.values())


def test_hybrid_weight_is_q_on_selected_rows_and_w_elsewhere():
    model = timm_model("resnet18")
    sq = quantize_model(model, QuantConfig("kbit", {"bits": 2}, sq=HALF))
    sq.draw_masks()
    for layer in sq.layers.values():
        w = layer.weight.detach()
        q, _ = layer.quantizer.quantize(rows(w))
        hybrid = rows(layer.sq_weight().detach())
        mask = layer.sq_mask
        assert torch.equal(hybrid[mask], q[mask])
        assert torch.equal(hybrid[~mask], rows(w)[~mask])
        assert not torch.equal(q[~mask], rows(w)[~mask])  # the two really differ


def test_gradient_reaches_every_row_of_the_real_weight():
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3))
    sq = quantize_model(model, QuantConfig("bwn", sq=HALF))
    sq.draw_masks()
    layer = model[1]
    x = torch.randn(5, 8)
    layer(x).sum().backward()
    # d sum(x W~^T) / dW = sum_b x_b for every row, quantized (straight through) or not
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(8, 8))


def test_include_and_exclude_patterns():
    model = timm_model("resnet18")
    sq = quantize_model(model, QuantConfig(include=("layer1.*", "layer2.*"), exclude=("*.conv2", "*downsample*")))
    assert sorted(sq.layers) == ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.1.conv1"]
    assert type(model.layer1[0].conv2) is nn.Conv2d


def test_stem_and_classifier_can_be_quantized_too():
    model = timm_model("resnet18")
    sq = quantize_model(model, QuantConfig(keep_stem_and_classifier=False))
    assert {"conv1", "fc"} <= set(sq.layers)
    assert len(sq.layers) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


def test_no_matching_layer_is_an_error():
    with pytest.raises(ValueError, match=r"no layer matched include=\['head.\*'\] exclude=\[\]"):
        quantize_model(timm_model("resnet18"), QuantConfig(include=("head.*",)))


def test_without_timm_cfg_the_first_and_last_layer_stay_full_precision():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    assert list(quantize_model(model).layers) == ["1", "2"]


def test_ratio_zero_is_the_float_model_and_ratio_one_is_plain_qat():
    model = small_timm_model().train()
    reference = copy.deepcopy(model)
    sq = quantize_model(model, QuantConfig("twn", sq=SQConfig(ratios=(0.0, 1.0), unit="step")))
    x = torch.randn(2, 3, 32, 32)

    sq.draw_masks()  # ratio 0: nothing drawn, every weight exactly W
    assert torch.equal(model(x), reference(x))
    assert all(torch.equal(l.sq_weight(), l.weight) for l in sq.layers.values())

    sq.advance("step")  # ratio 1: every row quantized, same as a model whose weights are Q
    sq.draw_masks()
    assert sq.quantized_fraction() == {n: 1.0 for n in sq.layers}
    with torch.no_grad():
        for name, layer in sq.layers.items():
            q, _ = layer.quantizer.quantize(rows(layer.weight))
            reference.get_submodule(name).weight.copy_(q.reshape(layer.weight.shape))
    torch.testing.assert_close(model(x), reference(x))


def test_eval_uses_the_fully_quantized_network():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    sq = quantize_model(model, QuantConfig("twn", sq=HALF))
    model.eval()  # no masks needed: the low-bit network is what gets evaluated
    q, _ = model[1].quantizer.quantize(model[1].weight)
    assert torch.equal(model[1].sq_weight(), q)


def test_training_forward_without_masks_says_what_to_call():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    quantize_model(model, QuantConfig(sq=HALF))
    with pytest.raises(RuntimeError, match=r"call SQController.draw_masks\(\)"):
        model(torch.randn(1, 4))


def test_schedule_moves_the_quantized_fraction():
    model = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 2))
    sq = quantize_model(model, QuantConfig(sq=SQConfig(ratios=(0.5, 0.75, 1.0), unit="epoch")))
    seen = []
    for epoch in range(4):
        for step in range(2):
            sq.draw_masks()
            seen.append(sq.quantized_fraction()["1"])
            sq.advance("step")
        sq.advance("epoch")
    assert seen == [0.5, 0.5, 0.75, 0.75, 1.0, 1.0, 1.0, 1.0]


def test_masks_are_redrawn_every_step():
    model = small_timm_model()
    sq = quantize_model(model, QuantConfig(sq=HALF))
    draws = []
    for _ in range(3):
        sq.draw_masks()
        draws.append(model.layer3[0].conv2.sq_mask.clone())
        sq.advance("step")
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


@pytest.mark.parametrize("layer_type", ["conv", "linear"])
def test_element_granularity_masks_have_the_weight_shape(layer_type):
    if layer_type == "conv":
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3), nn.Conv2d(6, 4, 3))
        x = torch.randn(2, 3, 9, 9)
    else:
        model = nn.Sequential(nn.Linear(5, 8), nn.Linear(8, 6), nn.Linear(6, 4))
        x = torch.randn(2, 5)
    sq = quantize_model(model, QuantConfig("kbit", {"bits": 2}, sq=SQConfig(ratios=(0.75,), granularity="element")))
    sq.draw_masks()
    layer = model[1]
    mask = layer.sq_mask
    assert mask.shape == layer.weight.shape
    assert int(mask.sum()) == round(0.75 * layer.weight.numel())
    q, _ = layer.quantizer.quantize(rows(layer.weight))
    hybrid = layer.sq_weight().detach()
    assert torch.equal(hybrid[mask], q.reshape(mask.shape)[mask])
    assert torch.equal(hybrid[~mask], layer.weight.detach()[~mask])
    model(x).sum().backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_draw_in_forward_draws_once_per_step():
    # the ZeRO-3 path: the layer draws its own mask when its forward runs
    model = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 2))
    sq = quantize_model(model, QuantConfig(sq=HALF, draw_in_forward=True))
    x = torch.randn(3, 4)
    sq.draw_masks()  # a no-op here; the forward draws
    model(x)
    first = model[1].sq_mask.clone()
    assert int(first.sum()) == 8 and "1" in sq.last_errors
    model(x)  # same step: same mask (gradient accumulation, activation recompute)
    assert torch.equal(model[1].sq_mask, first)
    changed = False
    for _ in range(5):
        sq.advance("step")
        model(x)
        changed |= not torch.equal(model[1].sq_mask, first)
    assert changed


def test_controller_state_round_trip_gives_the_same_next_masks():
    config = QuantConfig(sq=SQConfig(ratios=(0.5, 0.75), stage_length=2, unit="step", seed=3))
    model = small_timm_model()
    running = quantize_model(model, config)
    for _ in range(3):
        running.draw_masks()
        running.advance("step")
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "sq": running.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_model = small_timm_model()
    resumed = quantize_model(resumed_model, config)
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["sq"])
    assert resumed.ratio == running.ratio == 0.75
    for _ in range(2):
        running.draw_masks(), resumed.draw_masks()
        for name in running.layers:
            assert torch.equal(resumed.layers[name].sq_mask, running.layers[name].sq_mask), name
        running.advance("step"), resumed.advance("step")


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000])
def test_pack_bits_round_trip(n, generator):
    mask = torch.rand(n, generator=generator) < 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, n), mask)


def test_pack_bits_layout_is_little_endian():
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert pack_bits(mask).tolist() == [0b00001101, 0b00000001]


def test_quantizer_with_learnable_state_is_calibrated_and_trained():
    """A quantizer may hold parameters: quantize_model calibrates it, and they get gradients."""
    import torch
    from torch import nn

    import sqdist

    @sqdist.register_quantizer("test_learned_scale")
    class LearnedScale(sqdist.Quantizer):
        bits = 2

        def __init__(self):
            super().__init__()
            self.log_scale = nn.Parameter(torch.zeros(()))
            self.calibrated_from = None

        def calibrate(self, weight):
            self.calibrated_from = tuple(weight.shape)
            with torch.no_grad():
                self.log_scale.fill_(float(weight.abs().mean().log()))

        def quantize_codes(self, w):
            scale = self.log_scale.detach().exp().expand(w.shape[0])
            return torch.sign(w), scale

        def forward(self, weight):  # learned scale: gradient reaches log_scale, STE for the weight
            sign = torch.sign(weight)
            return weight + (sign - weight).detach() + sign.detach() * (self.log_scale.exp() - 1.0)

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    sq = sqdist.quantize_model(model, sqdist.QuantConfig("test_learned_scale", sq=sqdist.SQConfig(ratios=(1.0,))))
    layer = model[2]
    assert list(sq.layers) == ["2"] and layer.quantizer.calibrated_from == (8, 8)
    assert torch.isclose(layer.quantizer.log_scale.exp(), layer.weight.abs().mean())
    model(torch.randn(5, 4)).sum().backward()
    assert layer.quantizer.log_scale.grad is not None and layer.quantizer.log_scale.grad != 0
    assert "2.quantizer.log_scale" in dict(model.named_parameters())


def test_on_model_quantized_hook_sees_this_model_only():
    """A quantizer defining on_model_quantized(name, layers) gets its layer's name and its own model's
    SQ layers, once, after all layers are quantized and calibrated; a second model has its own."""
    import sqdist

    @sqdist.register_quantizer("test_model_hook")
    class Hooked(sqdist.Quantizer):
        bits = 1

        def calibrate(self, weight):
            self.calibrated = True

        def quantize_codes(self, w):
            return torch.sign(w), w.abs().mean(dim=1)

        def on_model_quantized(self, name, layers):
            assert all(layer.quantizer.calibrated for layer in layers.values())
            self.seen = (name, tuple(layers))
            self.group = tuple(layer.quantizer for layer in layers.values())  # a tuple: not a submodule

    def build():
        model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
        return model, quantize_model(model, QuantConfig("test_model_hook", keep_stem_and_classifier=False))

    model, sq = build()
    other, _ = build()
    assert [layer.quantizer.seen for layer in sq.layers.values()] == [(n, ("0", "1", "2", "3")) for n in "0123"]
    assert model[1].quantizer.group == tuple(model[i].quantizer for i in range(4))  # not the other model's
    assert not set(model[1].quantizer.group) & {other[i].quantizer for i in range(4)}
    assert list(model[1].quantizer.state_dict()) == [] and len(list(model.modules())) == 9
    copied = copy.deepcopy(model)
    assert copied[1].quantizer.group == tuple(copied[i].quantizer for i in range(4))


# ---------------------------------------------------------------- layers the model does not call
W4A8 = dict(quantizer="kbit", params={"bits": 4}, activations="lsq", activation_params={"bits": 8},
            sq=SQConfig(ratios=(1.0,)))


class TinyEncoder(nn.Module):
    """A small image transformer built on ``nn.TransformerEncoderLayer`` (not timm)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 4, 4)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x).flatten(2).transpose(1, 2)).mean(1))


def test_layers_whose_weight_the_model_reads_directly_stay_full_precision():
    """timm's EVA-02 computes its fused qkv as ``F.linear(x, self.qkv.weight, ...)``: the layer's forward never
    runs, so its quantized weight and input would not be used. quantize_model leaves it full precision and names
    it in one warning line; every activation quantizer of the rest sees its input."""
    model = timm.create_model("eva02_tiny_patch14_336", pretrained=False, num_classes=10, img_size=28)
    with pytest.warns(UserWarning, match=r"reads the weight without calling the layer") as caught:
        sq = quantize_model(model, QuantConfig(**W4A8))
    qkv = [f"blocks.{i}.attn.qkv" for i in range(12)]
    message = next(str(w.message) for w in caught if "without calling" in str(w.message))
    assert "\n" not in message and message.endswith(", ".join(qkv))
    assert not set(qkv) & set(sq.layers) and len(sq.layers) == 36  # proj, fc1, fc2 of 12 blocks
    assert all(type(model.get_submodule(n)) is nn.Linear for n in qkv)
    assert sqdist.calibrate_activations(model, torch.randn(2, 3, 28, 28)) == len(sq.activation_quantizers) == 36


def test_example_input_finds_a_layer_read_by_weight_in_any_model():
    class ReadsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.c(F.linear(self.b(x), self.a.weight, self.a.bias))

    model = ReadsWeight()
    with pytest.warns(UserWarning, match=r"without calling the layer.*: a$"):
        sq = quantize_model(model, QuantConfig("twn", keep_stem_and_classifier=False), example_input=torch.randn(2, 8))
    assert list(sq.layers) == ["b", "c"]
    assert list(quantize_model(ReadsWeight(), QuantConfig("twn", keep_stem_and_classifier=False)).layers) == \
        ["a", "b", "c"]  # no example input and no timm input size: nothing to probe with


@pytest.mark.parametrize("activations", [None, "lsq"])
def test_transformer_encoder_layer_evaluates_the_quantized_network(activations):
    """In eval under no_grad, nn.TransformerEncoderLayer's fused fast path reads linear1/linear2.weight directly;
    a quantized model must evaluate the quantized network there too, as it does with gradients on."""
    torch.manual_seed(0)
    model = TinyEncoder()
    float_model = copy.deepcopy(model).eval()
    config = {**W4A8, "activations": activations}
    sq = quantize_model(model, QuantConfig(**config))
    assert list(sq.layers) == [f"encoder.layers.{i}.linear{j}" for i in range(2) for j in (1, 2)]
    x = torch.randn(4, 3, 16, 16)
    if activations:
        sqdist.calibrate_activations(model, x)
    model.eval()
    with torch.no_grad():
        fast, reference = model(x), float_model(x)
    with torch.enable_grad():
        module_path = model(x).detach()
    assert torch.allclose(fast, module_path, atol=1e-6)
    assert (fast - reference).abs().max() > 1e-3  # the quantized network, not the float one


def test_transformer_encoder_with_a_padding_mask_evaluates_the_quantized_network():
    """nn.TransformerEncoder turns a padded batch into nested tensors in eval (a path its quantized layers cannot
    take); quantize_model keeps it on dense tensors, so eval under no_grad is the network trained."""
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, 32)
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2)
            self.head = nn.Linear(32, 3)

        def forward(self, x, mask):
            return self.head(self.encoder(self.embed(x), src_key_padding_mask=mask)[:, 0])

    torch.manual_seed(0)
    model = Tokens()
    float_model = copy.deepcopy(model).eval()
    quantize_model(model, QuantConfig(**{**W4A8, "activations": None}))  # 4-bit weights
    x, mask = torch.randn(3, 5, 8), torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 3:] = True
    model.eval()
    with torch.no_grad():
        fast, reference = model(x, mask), float_model(x, mask)
    with torch.enable_grad():
        module_path = model(x, mask).detach()
    assert torch.allclose(fast, module_path, atol=1e-6)
    assert (fast - reference).abs().max() > 1e-3
