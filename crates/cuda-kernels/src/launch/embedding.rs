//! Launchers of `kernels/embedding.cu`: token embedding lookup and its scatter-add backward.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};

use super::{check_lens, mul, plan_1d, to_i32, Plan1d};
use crate::device::Gpu;
use crate::error::{DriverContext, Error, Result};
use crate::registry::KernelId;
use crate::view::{DevIn, DevOut};

/// Token ids for the embedding launchers.
#[derive(Debug, Clone, Copy)]
pub enum TokenIds<'a> {
    /// Ids on the host: checked against the vocabulary, then copied to the device.
    Host(&'a [u32]),
    /// Ids already on the device: not checked (that would need a copy back);
    /// the kernels write a zero row for an id `>= vocab` in the forward and
    /// skip it in the backward.
    Device(&'a CudaSlice<u32>),
}

impl<'a> TokenIds<'a> {
    /// The ids when they are on the host (checked there), else `None`.
    fn host(&self) -> Option<&'a [u32]> {
        match *self {
            TokenIds::Host(h) => Some(h),
            TokenIds::Device(_) => None,
        }
    }

    /// How many ids there are.
    fn len(&self) -> usize {
        match self {
            TokenIds::Host(h) => h.len(),
            TokenIds::Device(d) => d.len(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EmbeddingPlan {
    n: Plan1d,
    vocab: u32,
    c: i32,
}

fn plan_embedding(
    op: &'static str,
    rows_len: usize,
    table_len: usize,
    ids: Option<&[u32]>,
    ids_len: usize,
    tokens: usize,
    vocab: usize,
    c: usize,
) -> Result<Option<EmbeddingPlan>> {
    let vc = mul(op, vocab, c)?;
    check_lens(op, &[("table", table_len, vc), ("ids", ids_len, tokens)])?;
    if let Some(host) = ids {
        if let Some((p, &id)) = host[..tokens].iter().enumerate().find(|(_, &i)| i as usize >= vocab) {
            return Err(Error::InvalidArgument {
                op,
                msg: format!("token id {id} at position {p} is out of range 0..{vocab}"),
            });
        }
    }
    let n = mul(op, tokens, c)?;
    let Some(n1) = plan_1d(op, n, &[("rows", rows_len)])? else {
        return Ok(None);
    };
    Ok(Some(EmbeddingPlan {
        n: n1,
        vocab: u32::try_from(vocab).unwrap_or(u32::MAX),
        c: to_i32(op, "c", c)?,
    }))
}

/// Embedding forward (kernel `embedding_forward_f32`; CPU twin
/// `aha_tensor::cpu::embedding_forward`): `out[n] = table[ids[n]]` for the
/// first `tokens` ids. `out [tokens, c]`, `table [vocab, c]`.
pub fn embedding_forward_f32(
    gpu: &Gpu,
    out: &mut impl DevOut<f32>,
    table: &impl DevIn<f32>,
    ids: TokenIds<'_>,
    tokens: usize,
    vocab: usize,
    c: usize,
) -> Result<()> {
    let mut out = out.view_mut();
    let table = table.view();
    const OP: &str = "embedding_forward_f32";
    let Some(p) = plan_embedding(OP, out.len(), table.len(), ids.host(), ids.len(), tokens, vocab, c)? else {
        return Ok(());
    };
    // SAFETY (of the launch in `launch_rows`): (float*, const float*, const
    // unsigned*, unsigned long long, unsigned, int); out holds tokens * c
    // floats, table vocab * c, ids `tokens`; the kernel reads a table row
    // only for an id < vocab.
    launch_rows(
        gpu,
        KernelId::EmbeddingForwardF32,
        OP,
        &mut out,
        &table,
        ids,
        tokens,
        &p,
    )
}

/// Embedding backward (kernel `embedding_backward_f32`; CPU twin
/// `aha_tensor::cpu::embedding_backward`): `dtable[ids[n]] += dout[n]` for the
/// first `tokens` ids, with atomicAdd, so a token that repeats accumulates in
/// no fixed order (f32 rounding may differ between runs).
/// `dtable [vocab, c]`, `dout [tokens, c]`.
pub fn embedding_backward_f32(
    gpu: &Gpu,
    dtable: &mut impl DevOut<f32>,
    dout: &impl DevIn<f32>,
    ids: TokenIds<'_>,
    tokens: usize,
    vocab: usize,
    c: usize,
) -> Result<()> {
    let mut dtable = dtable.view_mut();
    let dout = dout.view();
    const OP: &str = "embedding_backward_f32";
    let Some(p) = plan_embedding(OP, dout.len(), dtable.len(), ids.host(), ids.len(), tokens, vocab, c)? else {
        return Ok(());
    };
    // SAFETY (of the launch in `launch_rows`): (float*, const float*, const
    // unsigned*, unsigned long long, unsigned, int); dout holds tokens * c
    // floats, dtable vocab * c, ids `tokens`; the kernel writes a dtable row
    // only for an id < vocab.
    launch_rows(
        gpu,
        KernelId::EmbeddingBackwardF32,
        OP,
        &mut dtable,
        &dout,
        ids,
        tokens,
        &p,
    )
}

/// The one launch both embedding kernels share: `(dst, src, ids, n, vocab,
/// c)` over `p`, the ids uploaded first when they are on the host; `what`
/// names the launch in errors. The callers' plans checked every length the
/// kernels read.
#[allow(clippy::too_many_arguments)]
fn launch_rows(
    gpu: &Gpu,
    kernel: KernelId,
    what: &'static str,
    dst: &mut CudaViewMut<'_, f32>,
    src: &CudaView<'_, f32>,
    ids: TokenIds<'_>,
    tokens: usize,
    p: &EmbeddingPlan,
) -> Result<()> {
    let uploaded;
    let dev_ids = match ids {
        TokenIds::Host(h) => {
            uploaded = gpu.upload(&h[..tokens])?;
            &uploaded
        }
        TokenIds::Device(d) => d,
    };
    let f = gpu.function(kernel)?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(dst).arg(src).arg(dev_ids).arg(&p.n.n).arg(&p.vocab).arg(&p.c);
    // SAFETY: the argument list matches both kernels' signatures, and the
    // callers' plans checked the lengths (see their notes).
    unsafe { b.launch(p.n.config()) }.ctx(what)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The checks, on lengths alone: these run without a GPU.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn msg(e: Error) -> String {
        e.to_string()
    }

    #[test]
    fn embedding_plan_checks_host_ids_and_lengths() {
        let ids = [0u32, 4, 2];
        let p = plan_embedding("emb", 6, 10, Some(&ids), 3, 3, 5, 2).unwrap().unwrap();
        assert_eq!((p.n.n, p.vocab, p.c), (6, 5, 2));
        let e = msg(plan_embedding("emb", 6, 10, Some(&[0, 5, 1]), 3, 3, 5, 2).unwrap_err());
        assert!(e.contains("token id 5 at position 1 is out of range 0..5"), "{e}");
        // Device ids are not checked on the host.
        assert!(plan_embedding("emb", 6, 10, None, 3, 3, 5, 2).is_ok());
        assert!(msg(plan_embedding("emb", 5, 10, None, 3, 3, 5, 2).unwrap_err()).contains("rows holds 5"));
        assert!(msg(plan_embedding("emb", 6, 9, None, 3, 3, 5, 2).unwrap_err()).contains("table holds 9"));
        assert!(msg(plan_embedding("emb", 6, 10, Some(&ids[..2]), 2, 3, 5, 2).unwrap_err()).contains("ids holds 2"));
    }
}
