"""Row formats of an Engram table: the trained dtype (bf16, f16, f32) or FP8 e4m3 with scales.

FP8 rows follow DeepSeek-V4.1's Engram storage: values in float8 e4m3fn, one power-of-two
(ue8m0) scale byte per 32 values. Packed, a row is its W value bytes followed by its W/32 scale
bytes (256 values = 256 + 8 bytes), so one row is one contiguous read. Rows narrower than 32
values (the built-in model's are 16) are one group with one scale byte (16 values = 16 + 1
bytes): a group never spans two rows, since rows are gathered one by one.

Scale rule, per group of 32 values with amax = max |x|: scale = 2**e with e the smallest
integer such that amax <= 448 * 2**e (448 = e4m3 max), i.e. 2**ceil(log2(amax / 448)), found
exactly from frexp (no floating-point log). The scale byte is e + 127, with e clamped to
[-126, 127] so every scale is a normal float32. Byte 0 is reserved for an all-zero group
(amax 0): it decodes as scale 0.0, so the group dequantises to zeros. (OCP E8M0 reads byte 0 as
2**-127, a float32 subnormal no real table needs; 255, NaN there, is never written.)
Values are x / scale (exact: a power-of-two division) cast to e4m3fn, round to nearest even;
|x / scale| <= 448 by the rule, and the clamp before the cast keeps that true on any torch.

Dequantisation is float32(value) * float32(scale) then a cast to the output dtype: the product
is exact in float32, so any implementation that follows these steps (the Triton kernel in
``uva_kernel``) matches :func:`dequantize_fp8` bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

GROUP = 32  # values per scale byte
E4M3_MAX = 448.0
FORMATS = ("bf16", "f16", "f32", "fp8")
PLAIN_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
METADATA_KEY = "engram.row_format"  # safetensors metadata key of a quantised table file
ROW_FORMATS_KEY = "engram.row_formats"  # metadata of a table file: {tensor: row format}
# float32 value of every e4m3fn byte, from torch's own cast: on the CPU a table lookup is several
# times faster than the cast and gives the same bits
E4M3_TO_F32 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


@dataclass(frozen=True)
class RowFormat:
    """How one table row is stored. ``values`` is the row width W (the model's head_dim)."""

    name: str  # one of FORMATS
    values: int
    packed: bool = True  # fp8 only: scales stored at the end of each row

    def __post_init__(self) -> None:
        if self.name not in FORMATS:
            raise ValueError(f"unknown row format {self.name!r}; use one of {', '.join(FORMATS)}")
        if self.name == "fp8":
            check_fp8_width(self.values)

    @property
    def groups(self) -> int:
        return self.values // group_size(self.values) if self.name == "fp8" else 0

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored row (values and, when packed, scales)."""
        if self.name == "fp8":
            return self.values + (self.groups if self.packed else 0)
        return self.values * PLAIN_DTYPES[self.name].itemsize

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RowFormat:
        try:
            return cls(str(d["name"]), int(d["values"]), bool(d.get("packed", True)))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"bad row format {d!r} ({e}); re-run engram-quantize") from None

    @classmethod
    def from_json(cls, text: str) -> RowFormat:
        try:
            d = json.loads(text)
        except ValueError:
            raise ValueError(f"bad row format {text!r}; re-run engram-quantize") from None
        return cls.from_dict(d if isinstance(d, dict) else {})

    @classmethod
    def plain(cls, dtype: torch.dtype, values: int) -> RowFormat:
        for name, dt in PLAIN_DTYPES.items():
            if dt == dtype:
                return cls(name, values)
        raise ValueError(f"no row format for dtype {dtype}; use bfloat16, float16 or float32")


def group_size(width: int) -> int:
    """Values per scale byte in a row of ``width`` values: 32, or the whole row under 32."""
    return GROUP if width >= GROUP else width


def check_fp8_width(width: int) -> None:
    if width <= 0 or (width > GROUP and width % GROUP):
        raise ValueError(
            f"FP8 rows need a width under {GROUP} or a multiple of {GROUP}, got {width}; "
            "keep this table in bf16"
        )


def packed_width(packed_bytes: int) -> int:
    """W from the byte width of a packed fp8 row (W + W/32; W + 1 for rows under 32 values)."""
    if 2 <= packed_bytes <= GROUP:
        return packed_bytes - 1
    width, rem = divmod(packed_bytes * GROUP, GROUP + 1)
    if rem or width % GROUP or width == 0:
        raise ValueError(
            f"{packed_bytes} bytes is not a packed FP8 row (W + W/32 bytes with W a multiple "
            f"of {GROUP}, or W + 1 with W under {GROUP}); pass scales separately or check the "
            "table"
        )
    return width


def scale_exponents(amax: torch.Tensor) -> torch.Tensor:
    """ue8m0 bytes (uint8) for group maxima ``amax`` (float32, >= 0), exactly as documented."""
    mant, exp = torch.frexp(amax)  # amax = mant * 2**exp, mant in [0.5, 1)
    e = exp.to(torch.int32) - 9 + (mant > 0.875).to(torch.int32)  # 448 = 0.875 * 2**9
    byte = e.clamp(-126, 127) + 127
    return torch.where(amax > 0, byte, torch.zeros_like(byte)).to(torch.uint8)


def scales_from_bytes(scale_bytes: torch.Tensor) -> torch.Tensor:
    """float32 scales of ue8m0 bytes: the byte is the float32 exponent field (0 -> 0.0)."""
    return (scale_bytes.to(torch.int32) << 23).view(torch.float32)


def quantize_fp8(
    rows: torch.Tensor, packed: bool = True
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 rows with ue8m0 scales per 32 values.

    rows: [R, W] floating point, W a multiple of 32 (or under 32: one scale per row), finite.
    Packed: uint8 [R, W + W/32] (values then scales per row). Not packed: (values
    float8_e4m3fn [R, W], scales uint8 [R, W/32]).
    """
    if rows.dim() != 2 or not rows.is_floating_point():
        raise ValueError(f"want floating-point rows [R, W], got {tuple(rows.shape)} {rows.dtype}")
    r, w = rows.shape
    check_fp8_width(w)
    g = group_size(w)
    x = rows.to(torch.float32).reshape(r, w // g, g)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("rows contain NaN or inf; fix the table before quantising it")
    scale_bytes = scale_exponents(x.abs().amax(dim=2))
    scale = scales_from_bytes(scale_bytes)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: 0 / 1
    v = (x / safe[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(r, w)
    if not packed:
        return v, scale_bytes
    return torch.cat([v.view(torch.uint8), scale_bytes], dim=1)


def split_packed(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values uint8 [R, W], scales uint8 [R, W/32]) views of packed fp8 rows."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(
            f"packed FP8 rows are uint8 [R, W + W/32], got {tuple(packed.shape)} {packed.dtype}"
        )
    w = packed_width(packed.shape[1])
    return packed[:, :w], packed[:, w:]


def dequantize_fp8(
    packed: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference dequantisation (any device): [R, W] in ``out_dtype``.

    ``packed`` is uint8 [R, W + W/32]; or, with ``scales`` (uint8 [R, W/32]) given, the values
    alone as float8_e4m3fn or uint8 [R, W].
    """
    if scales is None:
        values, scales = split_packed(packed)
    else:
        values = packed
        g = group_size(values.shape[1]) if values.dim() == 2 and values.shape[1] else 1
        if values.dim() != 2 or scales.shape != (values.shape[0], values.shape[1] // g):
            raise ValueError(
                f"values {tuple(values.shape)} and scales {tuple(scales.shape)} do not match; "
                f"want [R, W] and [R, W/{GROUP}]"
            )
        check_fp8_width(values.shape[1])
    r, w = values.shape
    g = group_size(w)
    v = values.contiguous().view(torch.uint8)
    if v.device.type == "cpu":
        v = torch.from_numpy(E4M3_TO_F32[v.numpy()])
    else:
        v = v.view(torch.float8_e4m3fn).to(torch.float32)
    s = scales_from_bytes(scales.contiguous())
    return v.view(r, w // g, g).mul_(s[..., None]).view(r, w).to(out_dtype)
