"""Code maps: the small tables of values a low-bit index stands for.

A k-bit quantiser stores, for every weight, an index into a table `code` of 2^k values in
[-1, 1]; a per-block scale `absmax` maps the table onto the block. Everything about the
data type lives in the table, so this module is four tables and the arithmetic that builds
them.

NF4, NormalFloat (Dettmers et al. 2023, "QLoRA", arXiv:2305.14314, section 3).
    Pretrained weights are roughly N(0, sigma^2), and blockwise absmax scaling divides out
    sigma. For an information-theoretically optimal code each level should cover the same
    probability mass, so the levels are quantiles of N(0, 1):

        q_i = Phi^-1(p_i),    Phi^-1 = the normal quantile (torch.special.ndtri; scipy's norm.ppf)

    Phi^-1(0) and Phi^-1(1) are infinite, so the outermost probability is pulled in to
    `offset` = 0.9677083. An exact zero matters (padding, sparse weights), and a symmetric
    grid with a zero has an odd number of levels, so NF4 is asymmetric: 8 positive
    quantiles from linspace(offset, 0.5, 9) (dropping 0.5, whose quantile is 0), 7 negative
    ones from linspace(offset, 0.5, 8), and one 0. Finally it is normalised by its max so
    that it spans [-1, 1].

    0.9677083 is the mean of two candidate outer probabilities: 1 - 1/(2*15) = 0.966667
    (the centre of the last of 15 equal bins) and 1 - 1/(2*16) = 0.96875 (the same for 16);
    their mean is 0.9677083 to 7 digits. Notebook 04 checks this.

    Bit-exactness with bitsandbytes needs its arithmetic: the probabilities are a float32
    torch.linspace, the quantiles are computed from those float32 inputs in float64 (bitsandbytes
    calls scipy's norm.ppf; torch.special.ndtri agrees with it to 1e-7, far inside a float32
    step, and spares a QLoRA run importing scipy.stats, tens of MB of resident memory), the 16
    values are rounded to float32 and divided by their max in float32.

FP4 (the E2M1 float of bitsandbytes): 1 sign bit, 2 exponent bits, 1 mantissa bit. Its
    table is indexed by bit pattern, not sorted, so that a nibble decodes to its value
    directly. bitsandbytes' exponent field counts down (field 1 is the largest binade) and
    its one subnormal is 2^-4:   |value| = m * 2^-4 if e == 0 else (1 + m/2) * 2^(4 - e),
    giving magnitudes {0, 0.0625, 2, 3, 4, 6, 8, 12}, divided by 12.

int4 absmax: the uniform grid {-7..7}/7, what round(x / absmax * 7) gives. 15 levels.

Dynamic 8-bit map (Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning",
arXiv:1511.04561), used by double quantisation. After the sign bit, a run of zero bits sets
a decimal exponent, the first 1 bit ends the run, and the remaining bits are a linear
fraction in [0.1, 1]. With e leading zeros, the value is 10^-e times one of 2^(6-e) bin
centres of linspace(0.1, 1, 2^(6-e) + 1): small numbers get range, large ones precision.
"""
import torch

# The default outer probability of NF4 (QLoRA; see the module docstring).
NF4_OFFSET = 0.9677083


def create_normal_map(offset: float = NF4_OFFSET, use_extra_value: bool = True) -> torch.Tensor:
    """The NF4 code: 16 sorted float32 quantiles of N(0, 1), normalised to [-1, 1].

    use_extra_value=True gives the asymmetric 8 + 7 + zero code of QLoRA. False gives a
    symmetric 7 + 7 + zero code; one of the 16 indices is then a second zero (wasted).
    """
    n_pos = 8 if use_extra_value else 7
    # float32 probabilities from offset down to 0.5; the last one (0.5 -> quantile 0) is dropped.
    p_pos = torch.linspace(offset, 0.5, n_pos + 1)[:-1]  # (n_pos,) float32
    p_neg = torch.linspace(offset, 0.5, 8)[:-1]  # (7,) float32
    q_pos = torch.special.ndtri(p_pos.double())  # float64 quantiles of float32 inputs
    q_neg = -torch.special.ndtri(p_neg.double())
    zeros = torch.zeros(16 - n_pos - 7, dtype=torch.float64)  # 1 zero, or 2 in the symmetric code
    values = torch.cat([q_pos, zeros, q_neg]).float().sort().values
    return values / values.max()  # (16,) float32, max exactly 1.0


def _fp4_magnitude(e: int, m: int) -> float:
    """bitsandbytes' FP4 magnitude of exponent field e (2 bits) and mantissa bit m."""
    if e == 0:
        return m * 2.0**-4  # the subnormal
    return (1 + m / 2) * 2.0 ** (4 - e)  # exponent field counts down


def create_fp4_map() -> torch.Tensor:
    """The FP4 code, indexed by bit pattern s e1 e0 m (as bitsandbytes): (16,) float32."""
    values = []
    for bits in range(16):
        s, e, m = bits >> 3, (bits >> 1) & 0b11, bits & 1
        mag = _fp4_magnitude(e, m)
        values.append(-mag if s and mag else mag)  # pattern 1000 decodes to +0
    code = torch.tensor(values, dtype=torch.float32)
    return code / code.abs().max()  # magnitudes / 12


def create_int4_map() -> torch.Tensor:
    """The symmetric int4 absmax grid {-7, ..., 7} / 7: (15,) float32, sorted."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic tree code: 2^total_bits sorted float32 values (default: 256, signed).

    The decimal exponent 10^-e costs e zero bits plus one indicator bit, so each step down
    in scale leaves one fraction bit fewer: scale 10^0 gets 2^6 bin centres of [0.1, 1],
    10^-1 gets 2^5, ... 10^-6 gets 1. With 0 and 1.0 added, 127 + 127 + 2 = 256 values.
    """
    n_free = total_bits - 1 - max_exponent_bits  # bits that never hold the exponent
    top = max_exponent_bits - 1  # the largest scale is 10^(i - top) with i = top

    def centres(n_bins: int) -> torch.Tensor:  # centres of n equal bins of [0.1, 1], float32
        edges = torch.linspace(0.1, 1, n_bins + 1, dtype=torch.float32)
        return (edges[:-1] + edges[1:]) / 2

    levels = []
    for i in range(max_exponent_bits):  # scale 10^(i - top), 2^(i + n_free) fraction levels
        level = centres(2 ** (i + n_free + (0 if signed else 1))) * 10.0 ** (i - top)
        levels += [level, -level] if signed else [level]
    if n_free > 0:  # codes with no exponent indicator: 2^n_free - 1 more at the top scale
        level = centres(2**n_free - 1)
        levels += [level, -level] if signed else [level]
    code = torch.cat([*levels, torch.tensor([0.0, 1.0])])
    code = torch.cat([code, code.new_zeros(2**total_bits - code.numel())])  # pad with zeros
    return code.sort().values


# The 4-bit codes quantize_4bit accepts, built once.
_CODES: dict[str, torch.Tensor] = {}


def get_code(quant_type: str) -> torch.Tensor:
    """The (16,) float32 table of a 4-bit type: 'nf4' (sorted) or 'fp4' (bit-pattern order)."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if quant_type not in _CODES:
        _CODES[quant_type] = create_normal_map() if quant_type == "nf4" else create_fp4_map()
    return _CODES[quant_type]
