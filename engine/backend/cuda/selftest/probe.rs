//! Checks of kernels/probe.cu against the CPU path of engine/train/backprop.rs: rows gathered at
//! the loss positions, `cpu::rms_norm` with the final norm, `matmul_nt` onto the bf16-rounded
//! candidate rows of the LM head; and `cpu::rms_norm_backward` for the probe rows' backward.
//! Layer counts below and above the kernel's 8 per launch; odd row and candidate counts.
use super::{round_bf16, Checker, TOL_BF16, TOL_F32};
use crate::backend::cpu::{matmul_nt, rms_norm, rms_norm_backward};
use crate::backend::cuda::ops::loss::Ids;
use crate::backend::cuda::ops::probe::{probe_norm_backward, probe_normed, probe_project};
use crate::backend::cuda::{DeviceTensor, Elem};
use crate::error::Result;

pub(super) fn check(c: &mut Checker) -> Result<()> {
    // (layers, rows n of each layer output, probed rows m, h, V, S)
    for (l, n, m, h, v, s) in [(3usize, 50usize, 37usize, 96usize, 1000usize, 61usize), (4, 300, 130, 576, 49_152, 1024), (10, 40, 17, 80, 257, 52)] {
        case(c, l, n, m, h, v, s)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn case(c: &mut Checker, nl: usize, n: usize, m: usize, h: usize, v: usize, s: usize) -> Result<()> {
    let cuda = c.cuda;
    let eps = 1e-5f32;
    let shape = format!("{nl} layers, n {n}, m {m}, h {h}, V {v}, S {s}");
    let xs: Vec<Vec<f32>> = (0..nl).map(|_| c.random(n * h, 1.0)).collect();
    let gamma = c.uniform(h, 0.5, 1.5);
    let head = round_bf16(&c.random(v * h, 2.0 / (h as f32).sqrt()));
    let pos: Vec<u32> = (0..m).map(|_| c.rng.below(n) as u32).collect();
    let mut cand: Vec<u32> = (0..v as u32).collect();
    for i in 0..s {
        let j = i + c.rng.below(v - i);
        cand.swap(i, j);
    }
    cand.truncate(s);

    // CPU reference.
    let rows_s: Vec<f32> = cand.iter().flat_map(|&t| head[t as usize * h..(t as usize + 1) * h].iter().copied()).collect();
    let mut z_ref = vec![0.0f32; nl * m * s];
    let mut normed_ref = vec![0.0f32; nl * m * h];
    let dn = c.random(nl * m * h, 1.0);
    let mut dx_ref = vec![0.0f32; nl * m * h];
    for (l, x) in xs.iter().enumerate() {
        let xr: Vec<f32> = pos.iter().flat_map(|&p| x[p as usize * h..(p as usize + 1) * h].iter().copied()).collect();
        let nr = &mut normed_ref[l * m * h..(l + 1) * m * h];
        rms_norm(nr, &xr, &gamma, eps);
        matmul_nt(&mut z_ref[l * m * s..(l + 1) * m * s], s, nr, h, &rows_s, h, m, s, h, false);
        rms_norm_backward(&mut dx_ref[l * m * h..(l + 1) * m * h], &dn[l * m * h..(l + 1) * m * h], &xr, &gamma, eps);
    }

    let layers: Vec<DeviceTensor> = xs.iter().map(|x| DeviceTensor::from_f32(cuda, &[n, h], x, "layer output")).collect::<Result<_>>()?;
    let lrefs: Vec<&DeviceTensor> = layers.iter().collect();
    let gamma_d = DeviceTensor::from_f32(cuda, &[h], &gamma, "final norm")?;
    let head_d = DeviceTensor::from_f32_in(cuda, &[v, h], &head, Elem::BF16, "head")?;
    let pos_d = Ids::new(cuda, &pos, n, false, "probe rows")?;
    let cand_d = Ids::new(cuda, &cand, v, false, "candidates")?;

    let mut z = DeviceTensor::empty(cuda, &[nl, m, s], Elem::F32, "probe logits")?;
    z.fill_bytes(0xFF)?;
    probe_project(cuda, &mut z, &lrefs, &pos_d, &gamma_d, &head_d, &cand_d, eps)?;
    let got = z.to_f32_vec()?;
    let ms = c.time(5, || probe_project(cuda, &mut z, &lrefs, &pos_d, &gamma_d, &head_d, &cand_d, eps))?;
    c.record("probe_project_bf16", shape.clone(), &got, &z_ref, TOL_BF16, ms);

    let mut normed = DeviceTensor::empty(cuda, &[nl, m, h], Elem::F32, "probe normed rows")?;
    normed.fill_bytes(0xFF)?;
    probe_normed(cuda, &mut normed, &lrefs, &pos_d, &gamma_d, eps)?;
    let got = normed.to_f32_vec()?;
    let ms = c.time(5, || probe_normed(cuda, &mut normed, &lrefs, &pos_d, &gamma_d, eps))?;
    c.record("probe_normed_f32", shape.clone(), &got, &normed_ref, TOL_F32, ms);

    let dn_d = DeviceTensor::from_f32(cuda, &[nl, m, h], &dn, "normed-row gradients")?;
    let mut dx: Vec<DeviceTensor> = (0..nl).map(|_| DeviceTensor::empty(cuda, &[m, h], Elem::F32, "probe row gradients")).collect::<Result<_>>()?;
    for d in &dx {
        d.fill_bytes(0xFF)?;
    }
    probe_norm_backward(cuda, &mut dx, &dn_d, &lrefs, &pos_d, &gamma_d, eps)?;
    let mut got = Vec::with_capacity(nl * m * h);
    for d in &dx {
        got.extend(d.to_f32_vec()?);
    }
    let ms = c.time(5, || probe_norm_backward(cuda, &mut dx, &dn_d, &lrefs, &pos_d, &gamma_d, eps))?;
    c.record("probe_norm_bwd_f32", shape, &got, &dx_ref, TOL_F32, ms);
    Ok(())
}
