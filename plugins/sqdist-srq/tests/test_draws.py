"""SRQ's draws (DropBits' counts, a learned width's per-element widths) are made by the custom op
``sqdist_srq::draw`` from a key tensor, so that ``torch.compile`` traces them whole. They must stay what
they were before the op (runs resume from checkpoints and continue identically): here they are held to
the former code, a generator seeded with ``hash((run_seed, seed, step, salt, call))`` in the forward."""
import math

import pytest
import torch

sqdist_srq = pytest.importorskip("sqdist_srq")
from sqdist_srq import SRQActivation, SRQWeight, draws, fast, name_salt  # noqa: E402


def former_draws(key, shape, f=None, lo=None, p=0.0, limit=0):
    """The draws as the quantizers made them before the op: ``(widths or None, drop counts or None)``."""
    g = torch.Generator()
    g.manual_seed(hash(key) & (2 ** 63 - 1))
    widths = drop = None
    if f is not None:
        seeds = tuple(torch.randint(0, 2 ** 32, (2,), generator=g, dtype=torch.int64).tolist())
        f32 = float(torch.tensor(f, dtype=torch.float32))
        widths = fast.random_widths_reference(math.prod(shape), seeds, f32, lo).reshape(shape)
    if p > 0:
        u = torch.rand(shape, generator=g).clamp_(min=1e-12)
        drop = torch.floor(torch.log(u) / math.log(p)).clamp_(0, limit).to(torch.int64)
    return widths, drop


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_draws_are_those_of_the_former_code(schedule):
    """Weights with a learned width and DropBits, activations with DropBits: for three steps, two forwards
    each (the call counter), with a run seed, a seed and a salt, the op draws the former code's widths and
    counts, and the weight's training forward trains on exactly those (its value against ``_quantize`` on
    the levels the former draws give)."""
    w = torch.randn(6, 40)
    x = torch.randn(3, 50)
    wq = SRQWeight(bits=4, learn_bits=True, min_bits=2, drop_prob=0.3, drop_min_bits=2, drop_schedule=schedule,
                   seed=5)
    aq = SRQActivation(bits=3, drop_prob=0.4, drop_min_bits=1, drop_schedule=schedule, seed=7)
    wq.calibrate(w)
    with torch.no_grad():
        wq.soft_bits.fill_(3.3)
    with torch.no_grad():
        aq.init_from(x)
    for q, name in ((wq, "conv.quantizer"), (aq, "conv.input_quantizer")):
        q.set_run_seed(1234)
        q.on_model_quantized("conv", {"conv": type("L", (), {"quantizer": wq})()})
        assert q._salt == name_salt(name)
        q.train()
    seen = set()
    for step in range(3):
        for q in (wq, aq):
            q.set_progress(step, 4, 2)
        for call in range(2):
            p_w, p_a = wq.current_drop_prob(), aq.current_drop_prob()
            assert p_w == (0.3 * (1 - step / 4) if schedule == "linear" else 0.3)
            lo = 3
            f = wq._clamped_bits().detach() - lo
            widths, drop = former_draws((1234, 5, step, name_salt("conv.quantizer"), call), w.shape, float(f), lo,
                                        p_w, 4)
            got_w, got_d = wq._draw(w, f, torch.tensor([float(lo)]), 4)
            assert torch.equal(got_w, widths) and torch.equal(got_d, drop)
            wq._calls = call  # the same draw by the op that a compiled forward calls
            got_w, got_d = draws.draw(w, wq._key, f, torch.tensor([float(lo)]), wq.drop_prob, schedule == "linear", 4)
            assert torch.equal(got_w, widths) and torch.equal(got_d, drop) and wq._calls == call + 1
            _, adrop = former_draws((1234, 7, step, name_salt("conv.input_quantizer"), call), x.shape, p=p_a, limit=2)
            assert torch.equal(aq._draw(x, drop_limit=2)[1], adrop)
            seen.add((drop.sum().item(), widths.sum().item()))
            # the forward: the same draws again (the counter rewound), on the levels they give
            wq._calls = call
            width = widths.long()
            kept = torch.maximum(width - drop, torch.clamp(width, max=2))
            index = kept + 9 * (kept < width)
            expected = sqdist_srq._quantize(w, sqdist_srq.positive_step(wq.alpha), wq.sigma, wq._levels(), index)
            assert torch.equal(wq.fake_quantize(w).detach(), expected.detach())
            assert wq._calls == call + 1
    assert len(seen) == 6  # every (step, call) drew something new
