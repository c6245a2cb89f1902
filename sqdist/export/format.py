"""The packed low-bit file format (safetensors): constants, the error type, shared I/O helpers.

File layout. For a quantized layer ``L`` with weight of shape ``(m, ...)``:

- ``L.weight.packed``: uint8, the codes of the flattened weight, ``bits`` bits each,
  least significant bit first, packed densely (``ceil(numel * bits / 8)`` bytes).
  A code ``c`` is stored as ``c > 0`` when ``bits == 1`` (codes are +-1), else as
  ``c + L_max`` with ``L_max = 2^(bits-1) - 1`` (codes lie in ``[-L_max, L_max]``).
- A quantizer whose codes are not the symmetric range (a codebook of integer codes:
  SLB's ``{-3, -1, 1, 3}``, ESB's non-uniform levels, an asymmetric grid) defines
  ``code_levels()``: the sorted list of at most ``2^bits`` distinct integer codes it emits
  (int8 range). Its layer then stores each code's *index* in that list (``bits`` bits, same
  packing) and the list in ``packed[L]["levels"]`` (version 4, written only when a layer has one).
- ``L.weight.scale``: ``(m,)`` per-row scales, the weight's dtype; ``Q = scale[:, None] * codes``.
- ``L.input.scale``: float32 scalar, when the layer's input is quantized (an activation
  quantizer, ``quant.activations``): the input is ``clamp(round(x / scale), qmin, qmax) * scale``
  (zero point 0), ``qmin``/``qmax`` in the metadata field ``inputs`` (version 3).

With ``keep_fp_bits=8`` the layers kept at full precision (the other Conv/Linear
weights: stem, classifier, layers the recipe excludes) are stored the same way at 8 bits,
per-row symmetric (``scale_i = max |W_i| / 127``, codes in ``[-127, 127]``).

Every other ``state_dict`` entry (biases, full-precision layers at the default
``keep_fp_bits=32``, BatchNorm buffers) is stored as it is. The safetensors metadata (all
strings, JSON-encoded) holds ``format``, ``format_version``, ``sqdist_version``, ``model``
(timm name and kwargs), ``quantizer`` (name and ``config()``), ``sq``, ``layers`` (the
quantized layer names, in order), ``fp_layers`` (the full-precision layers stored at 8 bits,
in order; version 2), ``packed`` (per packed layer: shape, bits, dtype), ``inputs`` (per layer
whose input is quantized: zero_point, qmin, qmax; version 3, written only when there is one,
with ``activations``: the activation quantizer's name and ``config()``) and ``crc32`` (per
tensor, to catch corrupted bytes). Version 1 and 2 files still load.
"""
from __future__ import annotations

import torch

# the checked I/O has its public home in sqdist.files; the private names stay for the export modules
from ..files import ExportError  # noqa: F401 - the export's error type, re-exported
from ..files import crc32 as _crc32, json_field as _json_field, load_safetensors as _load_safetensors  # noqa: F401
from ..files import load_strict as _load_strict, one_line as _one_line, save_atomic as _save_atomic  # noqa: F401

FORMAT = "sqdist-packed"
FORMAT_VERSION = 2  # 2: adds fp_layers (full-precision layers stored at 8 bits)
INPUTS_VERSION = 3  # 3: adds inputs (quantized layer inputs); written only by files that have them
LEVELS_VERSION = 4  # 4: adds packed[L]["levels"] (codes stored as indices into a codebook)
READABLE_VERSIONS = (1, 2, 3, 4)
MAX_BITS = 8
KEEP_FP_BITS = (8, 32)  # how the layers left full precision are stored: 8-bit per-row codes, or as they are
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def check_keep_fp_bits(value, name: str = "keep_fp_bits") -> int:
    """``value`` if it is an allowed ``keep_fp_bits`` (8 or 32), else :class:`ExportError`."""
    if isinstance(value, str) and value.isdigit():  # from the command line
        value = int(value)
    if isinstance(value, bool) or value not in KEEP_FP_BITS:
        raise ExportError(f"{name}={value!r}; allowed: {' or '.join(map(str, KEEP_FP_BITS))} "
                          f"(8: per-row symmetric 8-bit codes, 32: stored as they are)")
    return int(value)


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ExportError(f"weight dtype {dtype} is not supported; allowed: {', '.join(_DTYPES)}")
