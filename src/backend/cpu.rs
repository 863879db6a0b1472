//! The cpu backend: plain Rust, f64 accumulation. It is the oracle the emu and cuda backends are
//! tested against, so it favours obviousness over speed.

use super::{host, Backend};
use crate::dtype::{DType, Element, Float};
use crate::error::Result;
use crate::shrink::ShrinkDense;

/// The reference backend (host memory, f64 accumulation, f64 dtype supported).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type Buffer<T: Element> = Vec<T>;

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn supports(&self, _dtype: DType) -> bool {
        true
    }
    fn alloc<T: Element>(&self, len: usize) -> Result<Vec<T>> {
        host::alloc(len)
    }
    fn upload<T: Element>(&self, data: &[T]) -> Result<Vec<T>> {
        Ok(data.to_vec())
    }
    fn download<T: Element>(&self, buf: &Vec<T>) -> Result<Vec<T>> {
        Ok(buf.clone())
    }
    fn write<T: Element>(&self, buf: &mut Vec<T>, data: &[T]) -> Result<()> {
        host::write(buf, data)
    }
    fn len<T: Element>(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    unsafe fn shrink_dense_unchecked<TX: Float, TW: Float>(
        &self,
        x: &Vec<TX>,
        a: &Vec<TW>,
        u: &mut Vec<f32>,
        s: &ShrinkDense,
    ) -> Result<()> {
        for t in 0..s.tokens {
            let x_row = &x[t * s.ld_x..t * s.ld_x + s.d_in];
            for j in 0..s.rank {
                let a_row = &a[j * s.lda..j * s.lda + s.d_in];
                let acc: f64 = x_row
                    .iter()
                    .zip(a_row)
                    .map(|(&xv, &av)| xv.to_f64() * av.to_f64())
                    .sum();
                u[t * s.ld_u + j] = acc as f32;
            }
        }
        Ok(())
    }
}
