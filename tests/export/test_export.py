"""Packed export: pack/unpack round trips, run folders -> .safetensors -> plain timm model."""
import json
import math
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import sqdist
from sqdist import QuantConfig, SQConfig, create_quantizer, list_quantizers, load_quantized, quantize_model
from sqdist.export import ExportError, export_model, main, pack_codes, read_packed, unpack_codes

ODD_SHAPES = [(1, 1), (3, 7), (5, 13), (17, 27), (64, 3 * 3 * 3)]


def quantizer_cases():
    cases = [(name, {}) for name in list_quantizers()]
    cases += [("kbit", {"bits": b}) for b in range(2, 9)] + [("kbit_pow2", {"bits": 3})]
    cases += [("twn", {"threshold": "layer"})]
    return cases


def test_plugin_quantizer_is_covered():
    assert {"bwn", "twn", "kbit", "kbit_pow2"} <= set(list_quantizers())


@pytest.mark.parametrize("name,params", quantizer_cases())
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_pack_unpack_round_trip(name, params, shape):
    from sqdist.export import pack_indexed, unpack_indexed

    q = create_quantizer(name, **params)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0] * 31 + shape[1]))
    q.calibrate(w)  # a quantizer with state from the weight (SLB's logits) needs it; a no-op for most
    codes, scale = q.quantize_codes(w)
    levels = getattr(q, "code_levels", lambda: None)()  # a codebook quantizer stores indices into its levels
    packed = pack_codes(codes, q.bits) if levels is None else pack_indexed(codes, levels, q.bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(w.numel() * q.bits / 8)  # dense: no per-row padding
    back = unpack_codes(packed, q.bits, w.numel()) if levels is None else unpack_indexed(packed, levels, q.bits, w.numel())
    assert torch.equal(back.to(codes.dtype).view(shape), codes)
    assert torch.allclose(back.float().view(shape) * scale[:, None], q.quantize(w)[0], rtol=0, atol=0)


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_code_value_survives(bits):
    limit = 2 ** (bits - 1) - 1
    codes = torch.tensor([-1, 1] * 5 + [1]) if bits == 1 else torch.arange(-limit, limit + 1).repeat(3)[:-1]
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, codes.numel()).long(), codes)


def test_codes_that_do_not_fit_are_refused():
    with pytest.raises(ExportError, match=r"code 2 does not fit 2 bit"):
        pack_codes(torch.tensor([0.0, 1.0, 2.0]), 2)
    with pytest.raises(ExportError, match="does not fit 1 bit"):
        pack_codes(torch.tensor([1.0, 0.0, -1.0]), 1)
    with pytest.raises(ExportError, match="not integer-valued"):
        pack_codes(torch.tensor([0.5]), 4)
    with pytest.raises(ExportError, match="bits=9"):
        pack_codes(torch.tensor([1.0]), 9)


def test_corrupted_fields_are_detected():
    packed = pack_codes(torch.tensor([-1.0, 0.0, 1.0]), 2)  # fields 0, 1, 2 -> one byte
    with pytest.raises(ExportError, match="exceeds 2"):
        unpack_codes(packed | 0b11, 2, 3)  # field 3 maps to no ternary code
    with pytest.raises(ExportError, match="padding bits"):
        unpack_codes(packed | 0b1000000, 2, 3)
    with pytest.raises(ExportError, match="expected uint8 of 1 bytes"):
        unpack_codes(torch.cat([packed, packed]), 2, 3)


# ---------------------------------------------------------------- models and run folders
def small_model(quantizer="twn", params=None, keep=True):
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    sq = quantize_model(model, QuantConfig(quantizer=quantizer, params=params or {}, keep_stem_and_classifier=keep,
                                           sq=SQConfig(ratios=(1.0,))))
    return model, sq


def write_run(run_dir, model, sq, quantizer="twn", params=None, ratio=1.0, enabled=True, stage=3):
    """Save ``model`` in the run-folder layout that training writes (final/ and one checkpoint)."""
    meta = {
        "model": {"name": "test_resnet", "kwargs": {"num_classes": 10, "in_chans": 1}},
        "quant": {"enabled": enabled, "name": quantizer, "params": params or {},
                  "layers": list(sq.layers) if enabled else []},
        "sq": {"ratio": ratio, "stage": stage},
        "sqdist_version": sqdist.__version__,
    }
    for sub in ("final", "checkpoints/step-000040"):
        (run_dir / sub).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / sub / "model.safetensors"))
        (run_dir / sub / "meta.json").write_text(json.dumps(meta))
    (run_dir / "checkpoints" / "latest").write_text("step-000040")
    (run_dir / "config.yaml").write_text("model: test_resnet\n")
    return run_dir


def cli(*args):
    """``python -m sqdist.export ARGS`` in a fresh process (slow: imports torch and timm)."""
    return subprocess.run([sys.executable, "-m", "sqdist.export", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def run_main(capsys):
    """The CLI's ``main`` in this process: same code path as ``cli``, without the start-up cost."""

    def call(*args):
        code = main([str(a) for a in args])  # an escaping exception would fail the test: no traceback path
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return call


def assert_one_line_error(proc, *words):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("name,params", [("bwn", {}), ("twn", {}), ("kbit", {"bits": 3}), ("kbit_pow2", {"bits": 4})])
def test_export_then_load_gives_the_quantized_logits(tmp_path, name, params):
    torch.manual_seed(0)
    model, sq = small_model(name, params)
    x = torch.randn(8, 1, 16, 16)
    model.train()
    model(torch.randn(16, 1, 16, 16))  # move BatchNorm statistics off their defaults
    model.eval()
    with torch.no_grad():
        expected = model(x)
    info = export_model(model, tmp_path / "m.safetensors", model_name="test_resnet",
                        model_kwargs={"num_classes": 10, "in_chans": 1})
    assert info["layers"] == len(sq.layers)
    loaded = load_quantized(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert (loaded(x) - expected).abs().max() <= 1e-5
    # a deployable float model: plain timm layers, no quantizers left
    modules = dict(loaded.named_modules())
    for layer in sq.layers:
        assert type(modules[layer]) in (nn.Conv2d, nn.Linear)
        w = modules[layer].weight.reshape(modules[layer].weight.shape[0], -1)
        assert torch.equal(w, create_quantizer(name, **params).quantize(sq.layers[layer].weight.reshape(w.shape))[0])
    # full-precision layers (stem, classifier) kept exactly
    assert torch.equal(loaded.fc.weight, model.fc.weight)
    assert "fc" not in sq.layers


def digits(size=16):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.35
    y = torch.tensor(data.target)
    return (x[:1437], y[:1437]), (x[1437:], y[1437:])  # fixed 80/20 split


@pytest.mark.slow
def test_trained_digits_run_end_to_end(tmp_path, run_main):
    """Train a tiny SQ TWN net on digits to ratio 1.0, export through the CLI, reload, same logits."""
    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = digits()
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    sq = quantize_model(model, QuantConfig(quantizer="twn", sq=SQConfig(ratios=(0.5, 1.0), unit="step",
                                                                       stage_length=15)))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(30):
        idx = torch.randint(0, len(xtr), (32,), generator=g)
        sq.draw_masks()
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sq.advance("step")
    assert sq.ratio == 1.0
    model.eval()
    with torch.no_grad():
        trained = model(xte)
    accuracy = (trained.argmax(1) == yte).float().mean().item()
    assert accuracy > 0.4  # chance is 0.1; it learned something, so the weights are no longer the initial ones

    run = write_run(tmp_path / "run", model, sq, ratio=sq.ratio, stage=sq.stage)
    out = tmp_path / "digits_twn.safetensors"
    proc = cli(run, out)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    loaded = load_quantized(out)
    with torch.no_grad():
        logits = loaded(xte)
    assert (logits - trained).abs().max().item() <= 1e-5
    assert out.stat().st_size < (run / "final" / "model.safetensors").stat().st_size / 4

    meta = read_packed(out)[1]
    assert meta["quantizer"] == {"name": "twn", "params": {"delta": 0.7, "threshold": "row"}}
    assert meta["model"] == {"name": "test_resnet", "kwargs": {"num_classes": 10, "in_chans": 1}}
    assert meta["layers"] == list(sq.layers)
    assert meta["sqdist_version"] == sqdist.__version__
    assert all(meta["packed"][n]["bits"] == 2 for n in sq.layers)

    check = run_main("--check", out)
    assert check.returncode == 0 and "ok" in check.stdout


def test_cli_accepts_a_checkpoint_folder_and_refuses_low_ratio(tmp_path, run_main):
    model, sq = small_model("bwn")
    run = write_run(tmp_path / "run", model, sq, quantizer="bwn", ratio=0.75, stage=1)
    out = tmp_path / "out.safetensors"
    proc = run_main(run / "checkpoints" / "step-000040", out)
    assert_one_line_error(proc, "sq.ratio=0.75", "--force", "meta.json")
    assert not out.exists()
    forced = run_main(run / "checkpoints" / "step-000040", out, "--force")
    assert forced.returncode == 0, forced.stderr
    assert read_packed(out)[1]["sq"]["ratio"] == 0.75


def test_low_ratio_refused_from_python(tmp_path):
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    quantize_model(model, QuantConfig(quantizer="twn", sq=SQConfig(ratios=(0.5, 1.0))))  # controller at 0.5
    with pytest.raises(ExportError, match="SQ ratio is 0.5 < 1.0"):
        export_model(model, tmp_path / "m.safetensors", model_kwargs={"num_classes": 10, "in_chans": 1})
    export_model(model, tmp_path / "m.safetensors", model_kwargs={"num_classes": 10, "in_chans": 1}, force=True)
    assert read_packed(tmp_path / "m.safetensors")[1]["model"]["name"] == "test_resnet"  # from pretrained_cfg


def test_full_precision_run_has_nothing_to_pack(tmp_path, run_main):
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    run = write_run(tmp_path / "run", model, None, enabled=False)
    assert_one_line_error(run_main(run, tmp_path / "o.safetensors"), "quant.enabled is false", "nothing to pack")
    with pytest.raises(ExportError, match="nothing to pack"):
        export_model(model, tmp_path / "o.safetensors")


@pytest.mark.slow
def test_cli_bad_inputs_are_one_line_errors(tmp_path, run_main):
    model, sq = small_model()
    run = write_run(tmp_path / "run", model, sq)
    assert_one_line_error(run_main(tmp_path / "nope", tmp_path / "o.safetensors"), "no such run or checkpoint folder")
    assert_one_line_error(run_main(run, tmp_path / "o.pt"), "allowed: a path ending in .safetensors")
    # training not finished: no final/, the message points at the latest checkpoint
    os.rename(run / "final", tmp_path / "final_aside")
    assert_one_line_error(run_main(run, tmp_path / "o.safetensors"), "checkpoints/step-000040")
    # a truncated checkpoint names the file and says what is wrong
    ckpt = run / "checkpoints" / "step-000040"
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    # in a real process: the exit status and stderr exactly as a user sees them
    assert_one_line_error(cli(ckpt, tmp_path / "o.safetensors"), str(ckpt / "model.safetensors"), "truncated")
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["quant"]["layers"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert_one_line_error(run_main(ckpt, tmp_path / "o.safetensors"), "'quant.layers' missing")


def test_truncated_or_corrupted_export_is_a_clear_error(tmp_path, run_main):
    model, _ = small_model("kbit", {"bits": 4})
    path = tmp_path / "m.safetensors"
    export_model(model, path, model_kwargs={"num_classes": 10, "in_chans": 1})
    data = path.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-100])
    with pytest.raises(ExportError, match=r"truncated\.safetensors: cannot be read as safetensors, truncated"):
        load_quantized(truncated)
    assert_one_line_error(run_main("--check", truncated), str(truncated), "truncated or corrupted")

    # flip one byte in the tensor data (after the 8-byte length and the JSON header)
    header = 8 + int.from_bytes(data[:8], "little")
    corrupted = tmp_path / "corrupted.safetensors"
    flipped = bytearray(data)
    flipped[header + (len(data) - header) // 2] ^= 0xFF
    corrupted.write_bytes(bytes(flipped))
    with pytest.raises(ExportError, match=r"corrupted\.safetensors: tensor '.*' fails its CRC32 check"):
        load_quantized(corrupted)

    plain = tmp_path / "plain.safetensors"  # a valid safetensors file that is not an export
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ExportError, match="not an sqdist packed export"):
        load_quantized(plain)
    with pytest.raises(ExportError, match="no such file"):
        load_quantized(tmp_path / "missing.safetensors")


def test_export_file_layout(tmp_path):
    model, sq = small_model("twn")
    path = tmp_path / "m.safetensors"
    export_model(model, path, model_kwargs={"num_classes": 10, "in_chans": 1})
    tensors = load_file(str(path))
    layer = "layer1.0.conv1"  # (32, 32, 3, 3)
    assert tensors[f"{layer}.weight.packed"].shape == (32 * 32 * 9 * 2 // 8,)
    assert tensors[f"{layer}.weight.scale"].shape == (32,)
    assert f"{layer}.weight" not in tensors
    assert "layer1.0.bn1.running_var" in tensors and "fc.weight" in tensors


def test_metadata_of_the_wrong_shape_is_a_clear_error(tmp_path):
    model, _ = small_model("bwn")
    path = tmp_path / "m.safetensors"
    export_model(model, path, model_kwargs={"num_classes": 10, "in_chans": 1})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**metadata, "packed": "[]"})
    with pytest.raises(ExportError, match=r"bad\.safetensors: metadata field 'packed' is a list; expected a dict"):
        load_quantized(bad)
    save_file(tensors, str(bad), metadata={**metadata, "layers": "{not json"})
    with pytest.raises(ExportError, match="metadata field 'layers' is not valid JSON"):
        load_quantized(bad)


# ---------------------------------------------------------------- full-precision layers at 8 bits
def with_8bit_full_precision_layers(model):
    """``model`` with each layer it keeps full precision (stem, classifier) set to its 8-bit
    per-row symmetric dequantized weight: what ``keep_fp_bits=8`` stores."""
    quantized = {n for n, m in model.named_modules() if hasattr(m, "quantizer")}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and name not in quantized:
                w2d = m.weight.reshape(m.weight.shape[0], -1)
                codes, scale = create_quantizer("kbit", bits=8, scale="max").quantize_codes(w2d)
                assert codes.abs().max() <= 127
                m.weight.copy_((codes * scale[:, None]).reshape(m.weight.shape))
    return model


def test_keep_fp_bits_8_stores_stem_and_classifier_as_8bit_codes(tmp_path):
    model, sq = small_model("twn")
    model.train()
    model(torch.randn(16, 1, 16, 16))  # move BatchNorm statistics off their defaults
    model.eval()
    fp32_path, int8_path = tmp_path / "fp32.safetensors", tmp_path / "int8.safetensors"
    export_model(model, fp32_path, model_kwargs={"num_classes": 10, "in_chans": 1})
    info = export_model(model, int8_path, model_kwargs={"num_classes": 10, "in_chans": 1}, keep_fp_bits=8)
    kept = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in sq.layers]
    assert kept and "fc" in kept and info["fp_layers"] == len(kept)

    tensors = load_file(str(int8_path))
    fc = model.fc.weight
    assert "fc.weight" not in tensors
    assert tensors["fc.weight.packed"].dtype == torch.uint8 and tensors["fc.weight.packed"].numel() == fc.numel()
    assert tensors["fc.weight.scale"].shape == (fc.shape[0],)
    meta = read_packed(int8_path)[1]
    assert meta["fp_layers"] == kept and meta["format_version"] == 2
    assert all(meta["packed"][n]["bits"] == 8 for n in kept)
    saved = sum(model.get_submodule(n).weight.numel() for n in kept) * 3  # 4 bytes -> 1 byte each
    assert fp32_path.stat().st_size - int8_path.stat().st_size > saved / 2  # less scales and metadata

    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        full = model(x)
        expected = with_8bit_full_precision_layers(model)(x)
        logits = load_quantized(int8_path)(x)
    assert (logits - expected).abs().max() <= 1e-5  # the model with its kept layers at 8 bits ...
    assert (logits - full).abs().max() > 1e-5  # ... which is not quite the fp32 one
    assert read_packed(fp32_path)[1]["fp_layers"] == []  # the default stores them as they are


def test_keep_fp_bits_other_values_are_refused(tmp_path, run_main):
    model, sq = small_model("bwn")
    with pytest.raises(ExportError, match=r"keep_fp_bits=16; allowed: 8 or 32"):
        export_model(model, tmp_path / "m.safetensors", model_kwargs={"num_classes": 10, "in_chans": 1},
                     keep_fp_bits=16)
    run = write_run(tmp_path / "run", model, sq, quantizer="bwn")
    proc = run_main(run, tmp_path / "m.safetensors", "--keep-fp-bits", "4")
    assert_one_line_error(proc, "--keep-fp-bits=4", "allowed: 8 or 32")
    assert proc.returncode == 2 and not (tmp_path / "m.safetensors").exists()
    ok = run_main(run, tmp_path / "m.safetensors", "--keep-fp-bits", "8")
    assert ok.returncode == 0, ok.stderr
    assert "full-precision layers at 8 bits" in ok.stdout


# Written by format version 1 (sqdist before fp_layers: git 5d16ea0's export_model) from a TWN
# resnet10t of the digits recipe's size; the logits file holds an input and the model's eval logits.
V1_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "packed_v1_resnet10t.safetensors")


def test_format_version_1_files_still_load(run_main):
    expected = load_file(V1_FILE.replace(".safetensors", ".logits.safetensors"))
    state, meta = read_packed(V1_FILE)
    assert meta["format_version"] == 1 and meta["fp_layers"] == []
    assert "fc.weight" in state and "fc.weight" not in meta["layers"]
    with torch.no_grad():
        logits = load_quantized(V1_FILE)(expected["input"])
    assert (logits - expected["logits"]).abs().max() <= 1e-5
    check = run_main("--check", V1_FILE)
    assert check.returncode == 0 and "ok" in check.stdout


# ---------------------------------------------------------------- codebook layers (code_levels)
class _OddLevels(sqdist.Quantizer):
    """2 bits, codes {-3, -1, 1, 3}: no symmetric 2-bit range holds them (a codebook layer)."""

    bits = 2
    quantizer_name = "odd_levels_test"

    def quantize_codes(self, w):
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 3
        codes = (torch.clamp(torch.floor(w / scale[:, None] / 2), -2, 1) * 2 + 1)  # nearest odd in [-3, 3]
        return codes, scale

    def code_levels(self):
        return [-3, -1, 1, 3]


@pytest.fixture
def registered():
    """Registers test quantizer classes by name for one test."""
    from sqdist.quant import registry

    added = []

    def add(cls):
        registry._QUANTIZERS[cls.quantizer_name] = cls
        added.append(cls.quantizer_name)
        return cls.quantizer_name

    yield add
    for name in added:
        registry._QUANTIZERS.pop(name, None)


def test_codebook_layers_pack_indices_and_load_back(tmp_path, registered):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    sq = quantize_model(model, QuantConfig(quantizer=registered(_OddLevels), sq=SQConfig(ratios=(1.0,))))
    model.eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(ExportError, match="does not fit"):  # without its codebook no 2-bit field holds 3
        pack_codes(torch.tensor([3.0, -1.0]), 2)
    info = export_model(model, tmp_path / "m.safetensors", model_name="test_resnet",
                        model_kwargs={"num_classes": 10, "in_chans": 1})
    state, meta = read_packed(tmp_path / "m.safetensors")
    assert meta["format_version"] == 4 and info["bits"] == [2]
    first = next(iter(sq.layers))
    assert meta["packed"][first]["levels"] == [-3, -1, 1, 3]
    raw = load_file(str(tmp_path / "m.safetensors"))
    numel = sq.layers[first].weight.numel()
    assert raw[f"{first}.weight.packed"].numel() == math.ceil(numel * 2 / 8)  # 2 bits per weight
    loaded = load_quantized(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert (loaded(x) - expected).abs().max() <= 1e-5
    rows = sq.layers[first].weight.shape[0]
    codes = set((state[f"{first}.weight"].reshape(rows, -1) / raw[f"{first}.weight.scale"][:, None]).round().unique().tolist())
    assert codes <= {-3.0, -1.0, 1.0, 3.0} and len(codes) > 2


def test_codebook_codes_outside_the_levels_are_refused(tmp_path, registered):
    from sqdist.export import pack_indexed, unpack_indexed

    packed = pack_indexed(torch.tensor([-3, 3, 1, -1, 3]), [-3, -1, 1, 3], 2)
    assert unpack_indexed(packed, [-3, -1, 1, 3], 2, 5).tolist() == [-3, 3, 1, -1, 3]
    with pytest.raises(ExportError, match="code_levels"):
        pack_indexed(torch.tensor([-3, 2]), [-3, -1, 1, 3], 2)
    with pytest.raises(ExportError, match="exceeds the 3 code levels"):
        unpack_indexed(pack_indexed(torch.tensor([3]), [-3, -1, 1, 3], 2), [-3, -1, 1], 2, 1)

    class Bad(_OddLevels):
        quantizer_name = "bad_levels_test"

        def code_levels(self):
            return [3, -3]  # not sorted

    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    quantize_model(model, QuantConfig(quantizer=registered(Bad), sq=SQConfig(ratios=(1.0,))))
    with pytest.raises(ExportError, match=r"code_levels\(\)=\[3, -3\]"):
        export_model(model, tmp_path / "m.safetensors", model_name="test_resnet")


# ---------------------------------------------------------------- quantized inputs at export
def w2a8_model():
    """test_resnet with TWN weights and LSQ 8-bit inputs, not calibrated yet."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    sq = quantize_model(model, QuantConfig(quantizer="twn", activations="lsq", activation_params={"bits": 8},
                                           sq=SQConfig(ratios=(1.0,))))
    return model, sq


def test_uncalibrated_activation_quantizers_are_refused(tmp_path):
    """An activation quantizer that never saw an input holds a placeholder step (1.0, unsigned): writing it
    would deploy a network that was never trained. Both writers refuse, in one line naming the layer."""
    from sqdist.export import export_onnx

    model, sq = w2a8_model()
    first = next(iter(sq.activation_quantizers))
    for write in (lambda: export_model(model, tmp_path / "m.safetensors", model_kwargs={"num_classes": 10, "in_chans": 1}),
                  lambda: export_onnx(model, tmp_path / "m.onnx", input_size=(1, 16, 16))):
        with pytest.raises(ExportError, match=rf"^layer {first}: activation quantizer 'lsq' was never calibrated") as err:
            write()
        assert "\n" not in str(err.value)
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.onnx").exists()
    x = torch.randn(4, 1, 16, 16)
    sqdist.calibrate_activations(model, x)
    export_model(model, tmp_path / "m.safetensors", model_kwargs={"num_classes": 10, "in_chans": 1})
    with torch.no_grad():
        assert (load_quantized(tmp_path / "m.safetensors")(x) - model.eval()(x)).abs().max() <= 1e-5


class TWNWithInputs(sqdist.quant.weights.TWN):
    """TWN weights whose rule also quantizes the layer's input: signed 4-bit codes, step 1/8."""

    step = 2.0 ** -3

    def quantize_input(self, x):
        return torch.clamp(torch.round(x / self.step), -8, 7) * self.step

    def activation_qparams(self):
        return self.step, 0, -8, 7


def test_weight_quantizer_input_and_activation_quantizer_are_both_exported(tmp_path):
    """The forward quantizes a layer's input twice: the weight quantizer's own rule, then quant.activations.
    With equal scales the two are one quantization (the first's codes clamped to the second's range), which the
    export writes; with different scales no single Q/DQ holds them and export refuses in one line."""
    model, sq = w2a8_model()
    x = torch.randn(4, 1, 16, 16)
    sqdist.calibrate_activations(model, x)
    for layer in sq.layers.values():
        layer.quantizer = TWNWithInputs()
        layer.input_quantizer.step.data.fill_(TWNWithInputs.step)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    export_model(model, tmp_path / "m.safetensors", model_kwargs={"num_classes": 10, "in_chans": 1})
    state, meta = read_packed(tmp_path / "m.safetensors")
    signed = {name: q._signed for name, q in sq.activation_quantizers.items()}
    assert {name: (i["qmin"], i["qmax"]) for name, i in meta["inputs"].items()} == \
        {name: (-8, 7) if s else (0, 7) for name, s in signed.items()}
    assert not all(signed.values())  # after a ReLU: unsigned, 0..7 of the first's -8..7
    with torch.no_grad():
        assert (load_quantized(tmp_path / "m.safetensors")(x) - expected).abs().max() <= 1e-5

    first = next(iter(sq.layers))
    sq.layers[first].input_quantizer.step.data.fill_(2.0 ** -4)
    with pytest.raises(ExportError, match=rf"^layer {first}: quantizer 'twn' quantizes its input with scale 0.125 "
                                          rf"and activation quantizer 'lsq' then with scale 0.0625"):
        export_model(model, tmp_path / "m2.safetensors", model_kwargs={"num_classes": 10, "in_chans": 1})


@pytest.mark.slow
def test_cli_bad_output_folder_input_size_or_source_file_is_one_line(tmp_path):
    """``python -m sqdist.export`` in a real process: every refusal is one stderr line naming the bad value, exit 2."""
    model, sq = small_model()
    run = write_run(tmp_path / "run", model, sq)
    plain = tmp_path / "some_file.safetensors"  # a safetensors file, not a run
    save_file({"w": torch.zeros(2)}, str(plain))
    missing = tmp_path / "missing" / "dir"
    cases = [
        ((run, tmp_path / "o.onnx", "--input-size", "0,8,8"), ["--input-size='0,8,8'", "positive integers"]),
        ((run, tmp_path / "o.onnx", "--input-size", "1,x,8"), ["--input-size='1,x,8'", "positive integers"]),
        ((run, tmp_path / "o.onnx", "--input-size", "1,\u00b2,8"), ["--input-size='1,\u00b2,8'", "positive integers"]),
        ((plain, tmp_path / "o.onnx"), [str(plain), "not a run or checkpoint folder"]),
        ((run, missing / "o.safetensors"), [str(missing), "does not exist"]),
        ((run, missing / "o.onnx"), [str(missing), "does not exist"]),
    ]
    for args, words in cases:
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert_one_line_error(proc, *words)
    assert not missing.exists() and not (tmp_path / "o.onnx").exists()


def test_writing_into_a_missing_folder_is_an_export_error(tmp_path):
    model, _ = small_model()
    with pytest.raises(ExportError, match=r"missing/m\.safetensors: cannot be written"):
        export_model(model, tmp_path / "missing" / "m.safetensors", model_kwargs={"num_classes": 10, "in_chans": 1})
