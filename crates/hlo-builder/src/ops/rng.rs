//! Counter-based random numbers built from `u32` ops: Threefry-2x32 (20 rounds, as in
//! Random123 and JAX), uniform and normal samples. Deterministic for a given key, on any backend.

use std::panic::Location;

use crate::builder::Builder;
use crate::error::Result;
use crate::shape::{Shape, ShapeError};
use crate::{ElementType, Op};

const ROTATIONS: [[u32; 4]; 2] = [[13, 15, 26, 6], [17, 29, 16, 24]];
const PARITY: u32 = 0x1BD1_1BDA;

/// Threefry-2x32 on the host (the reference the graph version is tested against).
pub fn threefry2x32_host(key: [u32; 2], counter: [u32; 2]) -> [u32; 2] {
    let ks = [key[0], key[1], key[0] ^ key[1] ^ PARITY];
    let (mut x0, mut x1) = (
        counter[0].wrapping_add(ks[0]),
        counter[1].wrapping_add(ks[1]),
    );
    for group in 0..5u32 {
        for &r in &ROTATIONS[(group % 2) as usize] {
            x0 = x0.wrapping_add(x1);
            x1 = x1.rotate_left(r) ^ x0;
        }
        x0 = x0.wrapping_add(ks[((group + 1) % 3) as usize]);
        x1 = x1
            .wrapping_add(ks[((group + 2) % 3) as usize])
            .wrapping_add(group + 1);
    }
    [x0, x1]
}

impl Builder {
    #[track_caller]
    fn check_u32(
        &self,
        loc: &'static Location<'static>,
        what: &'static str,
        op: Op,
        want: Option<&[i64]>,
    ) -> Result<Shape> {
        let s = self.shape_of(loc, what, op)?;
        let ok = s.ty() == Some(ElementType::U32) && want.is_none_or(|d| s.dims() == d);
        if !ok {
            let expect = want
                .map(|d| Shape::array(ElementType::U32, d).short())
                .unwrap_or_else(|| "a u32 array".into());
            return Err(self.shape_err(
                loc,
                ShapeError::new(what, format!("expected {expect}, got {}", s.short())),
            ));
        }
        Ok(s)
    }

    /// A PRNG key (`u32[2]`) from a 64-bit seed.
    #[track_caller]
    pub fn rng_key(&self, seed: u64) -> Result<Op> {
        self.constant_vec(vec![(seed >> 32) as u32, seed as u32], &[2])
    }

    #[track_caller]
    fn key_words(&self, key: Op) -> Result<(Op, Op)> {
        let k0 = self.slice(key, &[0], &[1], &[1])?;
        let k1 = self.slice(key, &[1], &[2], &[1])?;
        Ok((self.reshape(k0, &[])?, self.reshape(k1, &[])?))
    }

    /// Threefry-2x32 (20 rounds) of the counter pairs `(x0, x1)` (equal-shape `u32` arrays) under
    /// `key` (`u32[2]`). Returns the two output words.
    #[track_caller]
    pub fn threefry2x32(&self, key: Op, x0: Op, x1: Op) -> Result<(Op, Op)> {
        let loc = Location::caller();
        self.check_u32(loc, "threefry2x32", key, Some(&[2]))?;
        let s0 = self.check_u32(loc, "threefry2x32", x0, None)?;
        self.check_u32(loc, "threefry2x32", x1, Some(s0.dims()))?;
        let (k0, k1) = self.key_words(key)?;
        let parity = self.scalar(PARITY)?;
        let k2 = self.xor(self.xor(k0, k1)?, parity)?;
        let ks = [k0, k1, k2];
        let (mut a, mut b) = (self.add(x0, k0)?, self.add(x1, k1)?);
        for group in 0..5u32 {
            for &r in &ROTATIONS[(group % 2) as usize] {
                a = self.add(a, b)?;
                let left = self.shift_left(b, self.scalar(r)?)?;
                let right = self.shift_right_logical(b, self.scalar(32 - r)?)?;
                b = self.xor(self.or(left, right)?, a)?;
            }
            a = self.add(a, ks[((group + 1) % 3) as usize])?;
            let inj = self.add(ks[((group + 2) % 3) as usize], self.scalar(group + 1)?)?;
            b = self.add(b, inj)?;
        }
        Ok((a, b))
    }

    /// A new key derived from `key` and `data` (like `jax.random.fold_in`).
    #[track_caller]
    pub fn random_fold_in(&self, key: Op, data: u32) -> Result<Op> {
        let zero = self.constant_vec(vec![0u32], &[1])?;
        let d = self.constant_vec(vec![data], &[1])?;
        let (a, b) = self.threefry2x32(key, zero, d)?;
        self.concatenate(&[a, b], 0)
    }

    /// Uniformly random `u32` bits of shape `dims`.
    #[track_caller]
    pub fn random_bits(&self, key: Op, dims: &[i64]) -> Result<Op> {
        let loc = Location::caller();
        self.check_u32(loc, "random_bits", key, Some(&[2]))?;
        let n: i64 = dims.iter().product();
        if n == 0 {
            return self.zeros(ElementType::U32, dims);
        }
        let half = (n + 1) / 2;
        let c0 = self.iota(ElementType::U32, &[half], 0)?;
        let c1 = self.add(c0, self.scalar(half as u32)?)?;
        let (y0, y1) = self.threefry2x32(key, c0, c1)?;
        let all = self.concatenate(&[y0, y1], 0)?;
        let flat = if 2 * half == n {
            all
        } else {
            self.slice(all, &[0], &[n], &[1])?
        };
        self.reshape(flat, dims)
    }

    /// `f32` in `[0, 1)` from random bits (23 random mantissa bits).
    #[track_caller]
    fn bits_to_unit_f32(&self, bits: Op) -> Result<Op> {
        let mant = self.shift_right_logical(bits, self.scalar(9u32)?)?;
        let one_bits = self.or(mant, self.scalar(0x3F80_0000u32)?)?;
        let one_to_two = self.bitcast_convert(one_bits, ElementType::F32)?;
        self.sub(one_to_two, self.scalar(1.0f32)?)
    }

    /// Uniform samples in `[lo, hi)` of element type `ty` (a float type; computed in f32).
    #[track_caller]
    pub fn random_uniform(
        &self,
        key: Op,
        ty: ElementType,
        dims: &[i64],
        lo: f64,
        hi: f64,
    ) -> Result<Op> {
        let loc = Location::caller();
        if !ty.is_float() {
            return Err(self.shape_err(
                loc,
                ShapeError::new(
                    "random_uniform",
                    format!("element type must be a float type, got {ty}"),
                ),
            ));
        }
        let bits = self.random_bits(key, dims)?;
        let u = self.bits_to_unit_f32(bits)?;
        let scaled = self.mul(u, self.scalar((hi - lo) as f32)?)?;
        let shifted = self.add(scaled, self.scalar(lo as f32)?)?;
        self.convert(shifted, ty)
    }

    /// Standard normal samples of element type `ty` (Box-Muller in f32).
    #[track_caller]
    pub fn random_normal(&self, key: Op, ty: ElementType, dims: &[i64]) -> Result<Op> {
        let loc = Location::caller();
        if !ty.is_float() {
            return Err(self.shape_err(
                loc,
                ShapeError::new(
                    "random_normal",
                    format!("element type must be a float type, got {ty}"),
                ),
            ));
        }
        let n: i64 = dims.iter().product();
        let bits = self.random_bits(key, &[2, n])?;
        let u = self.bits_to_unit_f32(bits)?;
        let u1 = self.reshape(self.slice(u, &[0, 0], &[1, n], &[1, 1])?, dims)?;
        let u2 = self.reshape(self.slice(u, &[1, 0], &[2, n], &[1, 1])?, dims)?;
        // u1 in [0,1) -> 1 - u1 in (0, 1], so the log is finite.
        let one_minus = self.sub(self.scalar(1.0f32)?, u1)?;
        let r = self.sqrt(self.mul(self.scalar(-2.0f32)?, self.log(one_minus)?)?)?;
        let theta = self.mul(self.scalar(std::f32::consts::TAU)?, u2)?;
        let z = self.mul(r, self.cos(theta)?)?;
        self.convert(z, ty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threefry_known_answers() {
        // Random123 known-answer vectors for threefry2x32_20.
        assert_eq!(
            threefry2x32_host([0, 0], [0, 0]),
            [0x6b20_0159, 0x99ba_4efe]
        );
        assert_eq!(
            threefry2x32_host([u32::MAX, u32::MAX], [u32::MAX, u32::MAX]),
            [0x1cb9_96fc, 0xbb00_2be7]
        );
        assert_eq!(
            threefry2x32_host([0x1319_8a2e, 0x0370_7344], [0x243f_6a88, 0x85a3_08d3]),
            [0xc492_3a9c, 0x483d_f7a0]
        );
    }
}
