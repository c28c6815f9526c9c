//! Test weights and inputs shared by the GPU backends' tests (wgpu, CUDA): random
//! values, a matrix stored in any type, a norm weight.

use cairn::synthetic::SplitMix;
use cairn::weights::ModelFile;
use cairn_formats::{quant, CairnBuilder, GgmlType, GgufBuilder};

/// `n` values in [-1, 1) from `seed`.
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix(seed);
    (0..n).map(|_| r.next_f32()).collect()
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A file holding a random `[k, m]` matrix (m rows of k values) as `ty`, tensor "w": a
/// GGUF, or a `.cairn` for the FineQuant types (which GGUF cannot store).
pub fn weight_file(ty: GgmlType, k: usize, m: usize, seed: u64) -> ModelFile {
    let x = random(k * m, seed);
    let rb = ty.row_bytes(k as u64).unwrap() as usize;
    let mut bytes = vec![0u8; rb * m];
    // Row by row: a FineQuant row's last group may be short, so rows encode one at a time.
    for (src, dst) in x.chunks(k).zip(bytes.chunks_mut(rb)) {
        quant::quantize(ty, src, dst).unwrap();
    }
    let dims = [k as u64, m as u64];
    if let GgmlType::Fine(_) = ty {
        let c = CairnBuilder::new().tensor("w", &dims, ty, bytes).unwrap().build();
        return ModelFile::from_bytes("w.cairn", c).unwrap();
    }
    let g = GgufBuilder::new().tensor("w", &dims, ty, bytes).unwrap().build();
    ModelFile::from_bytes("w.gguf", g).unwrap()
}

/// A norm weight "n" of `len` values around 1.
pub fn norm_weight(len: usize) -> ModelFile {
    let w: Vec<f32> = random(len, 5).iter().map(|v| 1.0 + v).collect();
    let g = GgufBuilder::new().tensor("n", &[len as u64], GgmlType::F32, f32_bytes(&w)).unwrap().build();
    ModelFile::from_bytes("n.gguf", g).unwrap()
}
