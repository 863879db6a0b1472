//! Runs the emulator's self-test kernels (`cuda/selftest.cu`) on emu or cuda, and the plain-Rust
//! references they are checked against.
#![allow(dead_code)]

use std::ffi::{c_int, c_void};

use lora_kernels::ffi::sys;
use lora_kernels::{Backend, Emu, Error, KernelErrorKind};

/// A backend whose buffers the C launchers can take, with its set of self-test launchers.
pub trait Target: Backend {
    fn ptr<T: lora_kernels::Element>(&self, b: &Self::Buffer<T>) -> *const c_void;
    fn ptr_mut<T: lora_kernels::Element>(&self, b: &mut Self::Buffer<T>) -> *mut c_void;
    fn stream(&self) -> *mut c_void;
    fn last_error(&self) -> String;
    fn reduce(
        &self,
    ) -> unsafe extern "C" fn(*const sys::LkSelftestReduceParams, *mut c_void) -> c_int;
    fn warp_ops(
        &self,
    ) -> unsafe extern "C" fn(*const sys::LkSelftestWarpOpsParams, *mut c_void) -> c_int;
    fn matmul(
        &self,
    ) -> unsafe extern "C" fn(*const sys::LkSelftestMatmulParams, *mut c_void) -> c_int;
    fn mma_gemm(
        &self,
    ) -> unsafe extern "C" fn(*const sys::LkSelftestMmaGemmParams, *mut c_void) -> c_int;
}

impl Target for Emu {
    fn ptr<T: lora_kernels::Element>(&self, b: &Vec<T>) -> *const c_void {
        b.as_ptr().cast()
    }
    fn ptr_mut<T: lora_kernels::Element>(&self, b: &mut Vec<T>) -> *mut c_void {
        b.as_mut_ptr().cast()
    }
    fn stream(&self) -> *mut c_void {
        std::ptr::null_mut()
    }
    fn last_error(&self) -> String {
        unsafe { std::ffi::CStr::from_ptr(sys::lk_emu_last_error_message()) }
            .to_string_lossy()
            .into_owned()
    }
    fn reduce(
        &self,
    ) -> unsafe extern "C" fn(*const sys::LkSelftestReduceParams, *mut c_void) -> c_int {
        sys::lk_emu_selftest_reduce
    }
    fn warp_ops(
        &self,
    ) -> unsafe extern "C" fn(*const sys::LkSelftestWarpOpsParams, *mut c_void) -> c_int {
        sys::lk_emu_selftest_warp_ops
    }
    fn matmul(
        &self,
    ) -> unsafe extern "C" fn(*const sys::LkSelftestMatmulParams, *mut c_void) -> c_int {
        sys::lk_emu_selftest_matmul
    }
    fn mma_gemm(
        &self,
    ) -> unsafe extern "C" fn(*const sys::LkSelftestMmaGemmParams, *mut c_void) -> c_int {
        sys::lk_emu_selftest_mma_gemm
    }
}

#[cfg(feature = "cuda")]
impl Target for lora_kernels::Cuda {
    fn ptr<T: lora_kernels::Element>(
        &self,
        b: &lora_kernels::cudarc::driver::CudaSlice<T>,
    ) -> *const c_void {
        use lora_kernels::cudarc::driver::DevicePtr;
        // One stream only: the event guard can go at once.
        b.device_ptr(self.stream()).0 as *const c_void
    }
    fn ptr_mut<T: lora_kernels::Element>(
        &self,
        b: &mut lora_kernels::cudarc::driver::CudaSlice<T>,
    ) -> *mut c_void {
        use lora_kernels::cudarc::driver::DevicePtrMut;
        b.device_ptr_mut(lora_kernels::Cuda::stream(self)).0 as *mut c_void
    }
    fn stream(&self) -> *mut c_void {
        lora_kernels::Cuda::stream(self).cu_stream() as *mut c_void
    }
    fn last_error(&self) -> String {
        unsafe { std::ffi::CStr::from_ptr(sys::lk_cuda_last_error_message()) }
            .to_string_lossy()
            .into_owned()
    }
    fn reduce(
        &self,
    ) -> unsafe extern "C" fn(*const sys::LkSelftestReduceParams, *mut c_void) -> c_int {
        sys::lk_cuda_selftest_reduce
    }
    fn warp_ops(
        &self,
    ) -> unsafe extern "C" fn(*const sys::LkSelftestWarpOpsParams, *mut c_void) -> c_int {
        sys::lk_cuda_selftest_warp_ops
    }
    fn matmul(
        &self,
    ) -> unsafe extern "C" fn(*const sys::LkSelftestMatmulParams, *mut c_void) -> c_int {
        sys::lk_cuda_selftest_matmul
    }
    fn mma_gemm(
        &self,
    ) -> unsafe extern "C" fn(*const sys::LkSelftestMmaGemmParams, *mut c_void) -> c_int {
        sys::lk_cuda_selftest_mma_gemm
    }
}

/// Turns a launcher's code into a Result, with the backend's message.
pub fn check_code<B: Target>(b: &B, code: c_int) -> Result<(), Error> {
    if code == 0 {
        return b.synchronize();
    }
    Err(Error::Kernel {
        backend: b.name(),
        op: "selftest",
        code,
        kind: KernelErrorKind::from_code(code),
        message: b.last_error(),
    })
}

pub fn run_reduce<B: Target>(
    b: &B,
    x: &[f32],
    rows: usize,
    n: usize,
    block_threads: i32,
) -> Result<Vec<f32>, Error> {
    let xb = b.upload(x)?;
    let mut out = b.upload(&vec![f32::NAN; rows])?;
    let p = sys::LkSelftestReduceParams {
        x: b.ptr(&xb).cast(),
        out: b.ptr_mut(&mut out).cast(),
        rows: rows as i32,
        n: n as i32,
        block_threads,
    };
    check_code(b, unsafe { (b.reduce())(&p, b.stream()) })?;
    b.download(&out)
}

pub const WARP_OPS_OUTPUTS: usize = sys::LK_SELFTEST_WARP_OPS_OUTPUTS as usize;
pub const SENTINEL: i32 = sys::LK_SELFTEST_WARP_OPS_SENTINEL as i32;

pub fn run_warp_ops<B: Target>(
    b: &B,
    input: &[i32],
    blocks: usize,
    block_threads: usize,
) -> Result<Vec<i32>, Error> {
    let ib = b.upload(input)?;
    let mut out = b.upload(&vec![
        0x0bad_f00d_i32;
        blocks * block_threads * WARP_OPS_OUTPUTS
    ])?;
    let p = sys::LkSelftestWarpOpsParams {
        in_: b.ptr(&ib).cast(),
        out: b.ptr_mut(&mut out).cast(),
        blocks: blocks as i32,
        block_threads: block_threads as i32,
    };
    check_code(b, unsafe { (b.warp_ops())(&p, b.stream()) })?;
    b.download(&out)
}

pub fn run_matmul<B: Target>(
    b: &B,
    a: &[f32],
    bm: &[f32],
    m: usize,
    n: usize,
    k: usize,
) -> Result<Vec<f32>, Error> {
    let ab = b.upload(a)?;
    let bb = b.upload(bm)?;
    let mut c = b.upload(&vec![f32::NAN; m * n])?;
    let p = sys::LkSelftestMatmulParams {
        a: b.ptr(&ab).cast(),
        b: b.ptr(&bb).cast(),
        c: b.ptr_mut(&mut c).cast(),
        m: m as i32,
        n: n as i32,
        k: k as i32,
    };
    check_code(b, unsafe { (b.matmul())(&p, b.stream()) })?;
    b.download(&c)
}

/// `a` and `bm` hold f16 or bf16 bits (`dtype` = LK_F16 / LK_BF16).
#[allow(clippy::too_many_arguments)]
pub fn run_mma_gemm<B: Target>(
    b: &B,
    a: &[u16],
    bm: &[u16],
    m: usize,
    n: usize,
    k: usize,
    dtype: i32,
    narrow: bool,
) -> Result<Vec<f32>, Error> {
    let a16: Vec<lora_kernels::f16> = a.iter().map(|&v| lora_kernels::f16::from_bits(v)).collect();
    let b16: Vec<lora_kernels::f16> = bm
        .iter()
        .map(|&v| lora_kernels::f16::from_bits(v))
        .collect();
    let ab = b.upload(&a16)?;
    let bb = b.upload(&b16)?;
    let mut c = b.upload(&vec![f32::NAN; m * n])?;
    let p = sys::LkSelftestMmaGemmParams {
        a: b.ptr(&ab),
        b: b.ptr(&bb),
        c: b.ptr_mut(&mut c).cast(),
        m: m as i32,
        n: n as i32,
        k: k as i32,
        dtype,
        narrow: narrow as i32,
    };
    check_code(b, unsafe { (b.mma_gemm())(&p, b.stream()) })?;
    b.download(&c)
}

/// Plain-Rust reference of the warp-ops exerciser, written from the PTX ISA's `shfl.sync` and
/// `vote.sync` definitions (not from the emulator): for width w the segment of lane l is
/// `[l & !(w-1), (l & !(w-1)) + w - 1]`; idx reads `seg_start | (b & (w-1))`, up reads `l - b` if
/// ≥ seg_start, down `l + b` if ≤ seg_end, bfly `l ^ b` if ≤ seg_end, else the lane keeps its value.
pub fn warp_ops_reference(input: &[i32], blocks: usize, block_threads: usize) -> Vec<i32> {
    #[derive(Clone, Copy)]
    enum K {
        Idx,
        Up,
        Down,
        Bfly,
    }
    fn src(kind: K, lane: usize, b: usize, w: usize) -> usize {
        let start = lane & !(w - 1);
        let end = start + w - 1;
        let (j, ok) = match kind {
            K::Idx => {
                let j = start | (b & 31 & (w - 1));
                (j, j <= end)
            }
            K::Up => (lane.wrapping_sub(b), lane >= b && lane - b >= start),
            K::Down => (lane + b, lane + b <= end),
            K::Bfly => ((lane ^ (b & 31)), (lane ^ (b & 31)) <= end),
        };
        if ok {
            j
        } else {
            lane
        }
    }
    let threads = blocks * block_threads;
    let mut out = vec![SENTINEL; threads * WARP_OPS_OUTPUTS];
    for warp0 in (0..threads).step_by(32) {
        let v = |l: usize| input[warp0 + l];
        let ballot = |mask: u32, pred: &dyn Fn(i32) -> bool| -> u32 {
            (0..32)
                .filter(|&l| mask >> l & 1 == 1 && pred(v(l)))
                .fold(0u32, |acc, l| acc | 1 << l)
        };
        for lane in 0..32 {
            let mut r: Vec<i32> = Vec::with_capacity(WARP_OPS_OUTPUTS);
            let mut push = |x: i32| r.push(x);
            for w in [1usize, 2, 4, 8, 16, 32] {
                push(v(src(K::Idx, lane, lane * 3 + 1, w)));
                push(v(src(K::Idx, lane, 31 - lane, w)));
                push(v(src(K::Up, lane, 1, w)));
                push(v(src(K::Up, lane, 3, w)));
                push(v(src(K::Down, lane, 1, w)));
                push(v(src(K::Down, lane, 5, w)));
                push(v(src(K::Bfly, lane, 1, w)));
                push(v(src(K::Bfly, lane, 6, w)));
            }
            let v64 = |l: usize| {
                ((v(l) as u32 as u64) << 32) | (v(l).wrapping_mul(7).wrapping_add(1) as u32 as u64)
            };
            let r64 = v64(src(K::Bfly, lane, 5, 16));
            push(r64 as u32 as i32);
            push((r64 >> 32) as u32 as i32);
            let rd = (v(src(K::Down, lane, 2, 8)) as f64 * 0.5).to_bits();
            push(rd as u32 as i32);
            push((rd >> 32) as u32 as i32);
            push((v(src(K::Up, lane, 2, 32)) as f32 * 0.25).to_bits() as i32);
            let full = u32::MAX;
            let p1 = |x: i32| x & 1 == 1;
            let p2 = |x: i32| x > 0;
            push(ballot(full, &p1) as i32);
            push((ballot(full, &p1) != 0) as i32);
            push((ballot(full, &p1) == full) as i32);
            push(1);
            push(0);
            push(ballot(full, &p2) as i32);
            if lane < 16 {
                let m = 0x0000_ffffu32;
                push(v(src(K::Idx, lane, lane + 5, 16)));
                push(v(src(K::Bfly, lane, 3, 8)));
                push(v(src(K::Down, lane, 2, 16)));
                push(v(src(K::Up, lane, 2, 16)));
                push(ballot(m, &p1) as i32);
                push((ballot(m, &p2) != 0) as i32);
                push((ballot(m, &p2) == m) as i32);
            } else {
                (0..7).for_each(|_| push(SENTINEL));
            }
            if lane & 1 == 1 {
                let m = 0xaaaa_aaaau32;
                push(v(src(K::Bfly, lane, 2, 32)));
                push(v(src(K::Idx, lane, (lane * 5) | 1, 32)));
                push(ballot(m, &p1) as i32);
                push((ballot(m, &p2) == m) as i32);
                push(v(src(K::Down, lane, 4, 16)));
            }
            r.resize(WARP_OPS_OUTPUTS, SENTINEL);
            out[(warp0 + lane) * WARP_OPS_OUTPUTS..(warp0 + lane + 1) * WARP_OPS_OUTPUTS]
                .copy_from_slice(&r);
        }
    }
    out
}

/// The planted-bug launchers (emu only: on a GPU their results are undefined).
pub fn run_bug(
    launcher: unsafe extern "C" fn(*const sys::LkSelftestBugParams, *mut c_void) -> c_int,
    x: &[f32],
    block_threads: i32,
    fixed: bool,
) -> (Result<(), Error>, Vec<f32>) {
    let mut out = vec![f32::NAN; x.len()];
    let p = sys::LkSelftestBugParams {
        x: x.as_ptr(),
        out: out.as_mut_ptr(),
        n: x.len() as i32,
        block_threads,
        fixed: fixed as i32,
    };
    let r = check_code(&Emu, unsafe { launcher(&p, std::ptr::null_mut()) });
    (r, out)
}
