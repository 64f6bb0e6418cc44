//! Checks of `matmul` (cuBLAS, or the fallback when libcublas is absent) and of kernels/gemm.cu
//! called directly (`fallback_gemm`), against engine/backend/cpu/matmul.rs in f32. bf16 inputs
//! are rounded on the host and the reference runs on the rounded values, so an f32 output is held
//! to the f32 tolerance; a bf16 output to the bf16 one (its own rounding is ~2^-9 relative).
use super::{round_bf16, Checker, TOL_BF16, TOL_F32};
use crate::backend::cpu::{matmul_nn, matmul_nt, matmul_tn};
use crate::backend::cuda::ops::{fallback_gemm, matmul, Gemm, GemmImpl};
use crate::backend::cuda::{DeviceTensor, Elem};
use crate::error::{Error, Result};

/// (m, n, k): no dimension a multiple of the 32-wide tile, a single row, and a K over 1024.
const SHAPES: [(usize, usize, usize); 3] = [(37, 577, 129), (1, 1000, 576), (200, 96, 1031)];

#[derive(Clone, Copy, PartialEq)]
enum Types {
    F32,
    Bf16ToF32,
    Bf16,
}

impl Types {
    fn label(self) -> &'static str {
        match self {
            Types::F32 => "f32",
            Types::Bf16ToF32 => "bf16->f32",
            Types::Bf16 => "bf16->bf16",
        }
    }
    fn input_bf16(self) -> bool {
        self != Types::F32
    }
    fn output(self) -> Elem {
        if self == Types::Bf16 {
            Elem::BF16
        } else {
            Elem::F32
        }
    }
    /// The kernel `fallback_gemm` launches for these types.
    fn fallback_kernel(self) -> &'static str {
        match self {
            Types::F32 => "gemm_f32",
            Types::Bf16ToF32 => "gemm_bf16_f32",
            Types::Bf16 => "gemm_bf16",
        }
    }
}

pub(super) fn check(c: &mut Checker) -> Result<()> {
    for (m, n, k) in SHAPES {
        for base in [Gemm::NN, Gemm::NT, Gemm::TN] {
            let mut variants = vec![base, base.accumulate()];
            // alpha != 1 with beta = 1: both scalars reach cuBLAS through host pointers.
            if base == Gemm::NT {
                variants.push(base.scaled(-0.5).accumulate());
            }
            for g in variants {
                for ty in [Types::F32, Types::Bf16ToF32, Types::Bf16] {
                    case(c, m, n, k, g, ty)?;
                }
            }
        }
    }
    Ok(())
}

/// `v` on the device as f32 or bf16, and the values the device holds (the reference's input).
fn upload(c: &Checker, shape: &[usize], v: Vec<f32>, as_bf16: bool, what: &str) -> Result<(DeviceTensor, Vec<f32>)> {
    if as_bf16 {
        Ok((DeviceTensor::from_f32_as_bf16(c.cuda, shape, &v, what)?, round_bf16(&v)))
    } else {
        Ok((DeviceTensor::from_f32(c.cuda, shape, &v, what)?, v))
    }
}

fn case(c: &mut Checker, m: usize, n: usize, k: usize, g: Gemm, ty: Types) -> Result<()> {
    let cuda = c.cuda;
    let a_shape = if g.trans_a { [k, m] } else { [m, k] };
    let b_shape = if g.trans_b { [n, k] } else { [k, n] };
    let a_host = c.random(m * k, 1.0);
    let b_host = c.random(k * n, 1.0);
    let (a, a_ref) = upload(c, &a_shape, a_host, ty.input_bf16(), "gemm A")?;
    let (b, b_ref) = upload(c, &b_shape, b_host, ty.input_bf16(), "gemm B")?;
    let accumulate = g.beta != 0.0;
    // The initial C of an accumulating product, as the output type stores it.
    let c0 = if accumulate {
        let v = c.random(m * n, 1.0);
        if ty.output() == Elem::BF16 {
            round_bf16(&v)
        } else {
            v
        }
    } else {
        Vec::new()
    };

    // CPU: prod = op(A) @ op(B) in f32, then alpha * prod + beta * C0.
    let mut prod = vec![0.0f32; m * n];
    match (g.trans_a, g.trans_b) {
        (false, false) => matmul_nn(&mut prod, n, &a_ref, k, &b_ref, n, m, n, k, false),
        (false, true) => matmul_nt(&mut prod, n, &a_ref, k, &b_ref, k, m, n, k, false),
        (true, false) => matmul_tn(&mut prod, n, &a_ref, m, &b_ref, n, m, n, k, false),
        (true, true) => return Err(Error::Input(format!("gemm check: no CPU reference for {g:?}"))),
    }
    let reference: Vec<f32> = if accumulate {
        prod.iter().zip(&c0).map(|(&p, &c0)| g.alpha * p + g.beta * c0).collect()
    } else {
        prod.iter().map(|&p| g.alpha * p).collect()
    };

    let mode = match (g.trans_a, g.trans_b) {
        (false, false) => "NN",
        (false, true) => "NT",
        _ => "TN",
    };
    let shape = format!("{mode} m{m} n{n} k{k} alpha {} beta {} {}", g.alpha, g.beta, ty.label());
    let tol = if ty.output() == Elem::BF16 { TOL_BF16 } else { TOL_F32 };

    for via_matmul in [true, false] {
        let mut out = if accumulate {
            match ty.output() {
                Elem::BF16 => DeviceTensor::from_f32_as_bf16(cuda, &[m, n], &c0, "gemm C")?,
                _ => DeviceTensor::from_f32(cuda, &[m, n], &c0, "gemm C")?,
            }
        } else {
            let t = DeviceTensor::empty(cuda, &[m, n], ty.output(), "gemm C")?;
            // beta = 0 must not read C: NaN poison there fails the check if it does.
            t.fill_bytes(0xFF)?;
            t
        };
        let name = if via_matmul {
            match matmul(cuda, &mut out, &a, &b, g)? {
                GemmImpl::Cublas => "matmul (cublas)",
                GemmImpl::Fallback => "matmul (fallback)",
            }
        } else {
            fallback_gemm(cuda, &mut out, &a, &b, g)?;
            ty.fallback_kernel()
        };
        let got = out.to_f32_vec()?;
        // After the read-back: an accumulating product changes C again, not its time.
        let ms = if via_matmul {
            c.time(5, || matmul(cuda, &mut out, &a, &b, g).map(drop))?
        } else {
            c.time(5, || fallback_gemm(cuda, &mut out, &a, &b, g))?
        };
        c.record(name, shape.clone(), &got, &reference, tol, ms);
    }
    Ok(())
}
