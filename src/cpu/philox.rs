//! CPU twin of `shaders/philox.wgsl`: the Philox4x32-10 counter-based generator
//! (Salmon et al., SC'11) and the Gaussian noise derived from it. The integer stream is
//! bit-identical on both sides; the Gaussian goes through `ln`, `sqrt`, `cos` and `sin`,
//! whose last bits may differ between a GPU and the host.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Low and high words of the 64-bit product `a * b`.
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    (p as u32, (p >> 32) as u32)
}

/// Philox4x32 with 10 rounds: a bijection of the 128-bit `counter` under the 64-bit
/// `key`. Each round multiplies words 0 and 2 by M0 = 0xD2511F53 and M1 = 0xCD9E8D57,
/// mixes the high halves with words 1 and 3 and the key, and permutes; the key is
/// bumped by the Weyl constants W0 = 0x9E3779B9, W1 = 0xBB67AE85 between rounds.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let (lo0, hi0) = mulhilo(M0, c[0]);
        let (lo1, hi1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// A 32-bit word to a uniform in (0, 1]: `((x >> 8) + 1) / 2^24`, exact in f32 and
/// never 0, so its logarithm is finite.
pub(crate) fn uniform_open(x: u32) -> f32 {
    ((x >> 8) + 1) as f32 * (1.0 / 16_777_216.0)
}

/// `-ln(uniform_open(x))` with a small relative error everywhere. A GPU's `log` is only
/// bounded in absolute error near 1 (2^-21 on [0.5, 2] in WGSL), and the square root of
/// Box–Muller magnifies that for u close to 1; there `d = 1 - u` is exact
/// (`(!x >> 8) / 2^24`) and the series `d + d^2/2 + d^3/3` is used instead, on both
/// backends, for `d < 2^-8` (its truncation error is below 2^-26 relative).
pub(crate) fn neg_log_uniform_open(x: u32) -> f32 {
    let m = !x >> 8;
    if m < 1 << 16 {
        let d = m as f32 * (1.0 / 16_777_216.0);
        return d * (1.0 + d * (0.5 + d * (1.0 / 3.0)));
    }
    -uniform_open(x).ln()
}

/// Box–Muller on two words: `sqrt(-2 ln u1) * (cos, sin)(2 pi u2)`.
fn box_muller(a: u32, b: u32) -> (f32, f32) {
    let r = (2.0 * neg_log_uniform_open(a)).sqrt();
    let theta = std::f32::consts::TAU * uniform_open(b);
    (r * theta.cos(), r * theta.sin())
}

/// The four standard normals of one Philox block: counter
/// `(index4, tensor, step as (lo, hi))`, key `seed as (lo, hi)`; lanes 0 and 1 come from
/// words 0 and 1, lanes 2 and 3 from words 2 and 3. Element `i` of a tensor uses lane
/// `i % 4` of block `i / 4`.
pub fn gaussian_block(seed: u64, step: u64, tensor: u32, index4: u32) -> [f32; 4] {
    let r = philox4x32_10(
        [index4, tensor, step as u32, (step >> 32) as u32],
        [seed as u32, (seed >> 32) as u32],
    );
    let (z0, z1) = box_muller(r[0], r[1]);
    let (z2, z3) = box_muller(r[2], r[3]);
    [z0, z1, z2, z3]
}

/// The standard normal added (times sigma) to element `index` of tensor `tensor` at
/// training step `step` under `seed`: lane `index % 4` of
/// [`gaussian_block`]`(seed, step, tensor, index / 4)`. The same value on every backend
/// and launch geometry (up to the last bits of the transcendental functions).
pub fn gaussian_noise(seed: u64, step: u64, tensor: u32, index: u32) -> f32 {
    gaussian_block(seed, step, tensor, index >> 2)[(index & 3) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answers() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn neg_log_is_accurate_near_one() {
        let mut worst = 0.0f64;
        for m in (0u32..1 << 17).chain([(1 << 24) - 1]) {
            let x = !(m << 8);
            let want = -(((x >> 8) + 1) as f64 / 16_777_216.0).ln();
            let got = neg_log_uniform_open(x) as f64;
            if want == 0.0 {
                assert_eq!(got, 0.0);
            } else {
                worst = worst.max((got - want).abs() / want);
            }
        }
        assert!(
            worst < 4.0 * f32::EPSILON as f64,
            "relative error {worst:e}"
        );
    }

    #[test]
    fn uniform_is_in_open_unit_interval() {
        assert_eq!(uniform_open(u32::MAX), 1.0);
        assert_eq!(uniform_open(0), 1.0 / 16_777_216.0);
    }

    #[test]
    fn gaussian_moments() {
        let n = 1 << 20;
        let (mut s, mut s2, mut tail) = (0.0f64, 0.0f64, 0usize);
        for i in 0..n {
            let z = gaussian_noise(42, 3, 1, i) as f64;
            s += z;
            s2 += z * z;
            tail += (z.abs() > 3.0) as usize;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        // Standard errors: 1/sqrt(n) ~ 1e-3 for the mean, sqrt(2/n) ~ 1.4e-3 for the variance.
        assert!(mean.abs() < 5e-3, "mean {mean}");
        assert!((var - 1.0).abs() < 7e-3, "variance {var}");
        // P(|z| > 3) = 0.0027.
        let frac = tail as f64 / n as f64;
        assert!((frac - 0.0027).abs() < 5e-4, "tail {frac}");
    }

    #[test]
    fn streams_differ_by_seed_step_and_tensor() {
        let base = gaussian_block(1, 2, 3, 4);
        assert_ne!(base, gaussian_block(2, 2, 3, 4));
        assert_ne!(base, gaussian_block(1, 3, 3, 4));
        assert_ne!(base, gaussian_block(1, 2, 4, 4));
        assert_ne!(base, gaussian_block(1, 2, 3, 5));
        assert_eq!(gaussian_noise(1, 2, 3, 18), base[2]);
    }
}
