#!/usr/bin/env python3
"""Independent reference for diffgrad's counter-based Gaussian noise.

Run:   python3 tests/data/philox_reference.py > tests/data/philox_reference.hpp
Needs: Python 3.8 or newer, standard library only (integers and the decimal module).

It writes the known-answer table that tests/test_philox.cpp and tests/test_gaussian_batch.cpp
include. Nothing here is taken from diffgrad's C++ code; it is written from the published
descriptions:

  * Philox4x32-10, from "Parallel Random Numbers: As Easy as 1, 2, 3" (Salmon, Moraes, Dror,
    Shaw, SC'11): a 4-word counter and a 2-word key; each of 10 rounds multiplies counter
    words 0 and 2 by M0 = 0xD2511F53 and M1 = 0xCD9E8D57, and the new counter is
    (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)); the key is bumped by
    the Weyl constants (0x9E3779B9, 0xBB67AE85) between rounds. Checked below against the
    Random123 known-answer vectors ("philox4x32 10" lines of Random123's kat_vectors).
  * diffgrad's documented noise layout (docs/architecture.md, "Noise is counter-based"):
    element `index` of the noise of `step` under `seed` uses the Philox block with counter
    (pair low 32 bits, pair high 32 bits, step low 32 bits, step high 32 bits), pair =
    index // 2, and key (seed low 32 bits, seed high 32 bits). Words (w0, w1) give the
    uniform u1 = (w0 * 2^21 + (w1 >> 11) + 1) / 2^53 in (0, 1], words (w2, w3) give u2 the
    same way; Box-Muller gives sqrt(-2 ln u1) cos(2 pi u2) for even indices and
    sqrt(-2 ln u1) sin(2 pi u2) for odd ones.

The Gaussian values are computed to 50 significant digits (decimal module, our own series
for pi, ln, sin and cos) and then rounded once to double and, separately, once to float:
they are the exactly rounded values of the formula, not of any particular libm. The library
computes them in double with its own log/sin/cos, so the C++ test allows a few units in the
last place for double, and requires the float (the double rounded to float) to be the table
value exactly; the script checks that no float entry lies near a rounding boundary, where a
last-bit difference in double could flip it.
"""
import decimal
import struct
import sys
from decimal import Decimal

MASK32 = 0xFFFFFFFF
decimal.getcontext().prec = 60

# ---------------------------------------------------------------------------------------
# Philox4x32-10
# ---------------------------------------------------------------------------------------
M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85


def philox4x32_10(counter, key):
    c = list(counter)
    k0, k1 = key
    for rnd in range(10):
        if rnd > 0:  # the key schedule: bump before every round after the first
            k0 = (k0 + W0) & MASK32
            k1 = (k1 + W1) & MASK32
        p0 = M0 * c[0]  # exact 64-bit products (Python integers)
        p1 = M1 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & MASK32, p1 & MASK32,
             ((p0 >> 32) ^ c[3] ^ k1) & MASK32, p0 & MASK32]
    return tuple(c)


# Random123 known-answer vectors for philox4x32 with 10 rounds: counter, key -> output.
RANDOM123_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
for _ctr, _key, _want in RANDOM123_KAT:
    assert philox4x32_10(_ctr, _key) == _want, "Philox4x32-10 disagrees with Random123"

# ---------------------------------------------------------------------------------------
# High-precision elementary functions (decimal, 60 digits)
# ---------------------------------------------------------------------------------------


def pi_decimal():
    # Machin: pi = 16 atan(1/5) - 4 atan(1/239)
    def atan_inv(n):
        x = Decimal(1) / n
        x2 = x * x
        term, total, k = x, x, 1
        while True:
            term *= -x2
            add = term / (2 * k + 1)
            if abs(add) < Decimal(10) ** -70:
                return total
            total += add
            k += 1
    return 16 * atan_inv(5) - 4 * atan_inv(239)


PI = pi_decimal()


def sin_cos(x):
    """sin and cos of a Decimal x in [0, 2 pi] by their Taylor series (terms < 1e-70)."""
    x = x - PI  # |x| <= pi keeps the terms small; sin(x + pi) = -sin x, cos(x + pi) = -cos x
    x2 = x * x
    s_term, c_term, s, c, n = x, Decimal(1), x, Decimal(1), 1
    while True:
        s_term *= -x2 / ((2 * n) * (2 * n + 1))
        c_term *= -x2 / ((2 * n - 1) * (2 * n))
        s += s_term
        c += c_term
        if abs(s_term) < Decimal(10) ** -70 and abs(c_term) < Decimal(10) ** -70:
            return -s, -c
        n += 1


def uniform(hi, lo):
    """diffgrad's uniform in (0, 1] from two Philox words (53 bits), as an exact Decimal."""
    bits = (hi << 21) + (lo >> 11)
    return (Decimal(bits) + 1) / Decimal(2) ** 53


def gaussian_exact(seed, step, index):
    pair = index >> 1
    counter = (pair & MASK32, pair >> 32, step & MASK32, step >> 32)
    words = philox4x32_10(counter, (seed & MASK32, seed >> 32))
    u1, u2 = uniform(words[0], words[1]), uniform(words[2], words[3])
    radius = (-2 * u1.ln()).sqrt()
    s, c = sin_cos(2 * PI * u2)
    return words, radius * (s if index & 1 else c)


# ---------------------------------------------------------------------------------------
# Correct rounding to double and float
# ---------------------------------------------------------------------------------------


def round_to_double(x):
    return float(x)  # Decimal -> float is correctly rounded (via its exact decimal string)


def float32_neighbours(f):
    b = struct.unpack("<I", struct.pack("<f", f))[0]
    out = [f]
    for nb in (b - 1, b + 1):
        out.append(struct.unpack("<f", struct.pack("<I", nb & MASK32))[0])
    return out


def round_to_float32(x):
    """Nearest float32 to the exact Decimal x, plus its distance to the nearest rounding
    boundary in units of the float's ulp (0.5 = as far as can be)."""
    guess = struct.unpack("<f", struct.pack("<f", float(x)))[0]
    cands = sorted(float32_neighbours(guess), key=lambda v: abs(Decimal(v) - x))
    best = cands[0]
    nbrs = sorted(float32_neighbours(best))
    ulp = Decimal(nbrs[2]) - Decimal(best)
    margin = Decimal(0.5) - abs(Decimal(best) - x) / ulp
    return best, margin


def hex_float32(f):
    return float(f).hex()  # exact: a float32 is a double


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------
U64 = (1 << 64) - 1
CASES = [
    # seed, step, index: small ones, both members of a pair, neighbouring pairs, every
    # 32-bit half of seed, step and pair index set, and the 64-bit extremes.
    (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3),
    (42, 7, 0), (42, 7, 1), (42, 7, 10), (42, 7, 11), (42, 7, 12345), (42, 7, 12346),
    (2024, 11, 999999), (2024, 11, 1000000),
    (1, 2, 3), (1 + (1 << 32), 2, 3), (1, 2 + (1 << 32), 3), (1, 2, 3 + (1 << 33)),
    (0x0123456789ABCDEF, 1 << 40, 1 << 50), (0x0123456789ABCDEF, 1 << 40, (1 << 50) + 1),
    (U64, U64, U64), (U64, U64, U64 - 1), (U64, 0, (1 << 33) - 1), (0, U64, 1 << 33),
    (77, 5, 0), (77, 5, 90), (77, 5, 91), (123456789, 1000, 4294967295),
    (123456789, 1000, 4294967296), (987654321987654321, 3, 8589934593),
]


def main():
    out = sys.stdout
    out.write("// Generated by tests/data/philox_reference.py (an independent Python implementation\n")
    out.write("// of Philox4x32-10 and diffgrad's documented Box-Muller layout); do not edit by hand.\n")
    out.write("// Columns: seed, step, index, the 4 Philox words of the index's pair, gaussian()\n")
    out.write("// correctly rounded to double, and correctly rounded to float.\n")
    out.write("#pragma once\n#include <cstdint>\n\nnamespace diffgrad_test {\n\n")
    out.write("struct GaussianKat {\n  std::uint64_t seed, step, index;\n"
              "  std::uint32_t words[4];\n  double value;\n  float value_float;\n};\n\n")
    out.write("inline constexpr GaussianKat kGaussianKats[] = {\n")
    for seed, step, index in CASES:
        words, exact = gaussian_exact(seed, step, index)
        d = round_to_double(exact)
        f, margin = round_to_float32(exact)
        # A double result off by a few ulps must still round to this float.
        assert margin > Decimal("1e-6"), f"float entry too close to a boundary: {seed} {step} {index}"
        w = ", ".join(f"0x{v:08x}u" for v in words)
        out.write(f"    {{0x{seed:x}ull, 0x{step:x}ull, 0x{index:x}ull, {{{w}}},\n"
                  f"     {d.hex()}, {hex_float32(f)}f}},  // {d!r}\n")
    out.write("};\n\n} // namespace diffgrad_test\n")


if __name__ == "__main__":
    main()
