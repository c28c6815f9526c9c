//! `cairn convert`: any model file (GGUF of any supported block type, or `.cairn`) to a
//! `.cairn` with the linear weights re-encoded as f16, FineQuant int4/int8 (fixed or
//! adaptive groups) or plain round-to-nearest int2/int3/int4.
//!
//! Linear weights are the 2-D `blk.*` matrices; embeddings, norms and the output head
//! are copied in their source type, so formats compare on exactly the weights they
//! change. Each matrix is dequantized to f32 and re-quantized, rows in parallel.

use std::io::Write;
use std::path::Path;

use cairn_formats::fine::{self, FineType, Rounding};
use cairn_formats::{quant, CairnBuilder, GgmlType, MetaValue, TensorInfo};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::weights::ModelFile;

/// What the linear weights become.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Quant {
    F16,
    /// FineQuant: fixed group size.
    Fine {
        bits: u8,
        group: usize,
    },
    /// FineQuant with the adaptive per-matrix group rule.
    FineAuto {
        bits: u8,
    },
    /// Plain round to nearest (min-max, asymmetric) with a fixed group.
    Rtn {
        bits: u8,
        group: usize,
    },
}

impl Quant {
    /// Parse `--quant` and `--group` as the CLI takes them.
    pub fn parse(name: &str, group: Option<usize>) -> Result<Quant> {
        let fixed = |g: Option<usize>| g.unwrap_or(64);
        let q = match name {
            "f16" => Quant::F16,
            "fq8" => Quant::Fine { bits: 8, group: fixed(group) },
            "fq4" => Quant::Fine { bits: 4, group: fixed(group) },
            "fq8-auto" => Quant::FineAuto { bits: 8 },
            "fq4-auto" => Quant::FineAuto { bits: 4 },
            "rtn2" => Quant::Rtn { bits: 2, group: fixed(group) },
            "rtn3" => Quant::Rtn { bits: 3, group: fixed(group) },
            "rtn4" => Quant::Rtn { bits: 4, group: fixed(group) },
            other => {
                return Err(Error::input(format!(
                    "unknown --quant {other} (f16, fq8, fq4, fq8-auto, fq4-auto, rtn2, rtn3, rtn4)"
                )))
            }
        };
        if group.is_some() && matches!(q, Quant::F16 | Quant::FineAuto { .. }) {
            return Err(Error::input(format!("--group does not apply to --quant {name}")));
        }
        if let Quant::Fine { bits, group } | Quant::Rtn { bits, group } = q {
            FineType::new(bits, bits == 8, group).map_err(|e| Error::input(format!("--group {group}: {e}")))?;
        }
        Ok(q)
    }

    pub fn label(&self) -> String {
        match *self {
            Quant::F16 => "f16".into(),
            Quant::Fine { bits, group } => format!("fq{bits} g{group}"),
            Quant::FineAuto { bits } => format!("fq{bits}-auto"),
            Quant::Rtn { bits, group } => format!("rtn{bits} g{group}"),
        }
    }
}

/// Whether a tensor is a linear layer's weight (what conversion re-encodes).
pub fn is_linear(t: &TensorInfo) -> bool {
    t.dims.len() == 2 && t.name.starts_with("blk.") && t.name.ends_with(".weight") && !t.name.contains("norm")
}

/// The choice made for one matrix, as `convert` reports it.
#[derive(Debug, Clone)]
pub struct MatrixReport {
    pub name: String,
    pub ty: GgmlType,
    /// `(group, squared error)` of each candidate the adaptive rule tried.
    pub tried: Vec<(usize, f64)>,
    pub bytes: u64,
    pub params: u64,
}

/// Convert `src` into `.cairn` bytes, adding `extra` metadata (provenance).
/// `progress` is called with (values done, total).
pub fn convert(
    src: &ModelFile,
    quant: Quant,
    extra: &[(String, MetaValue)],
    mut progress: impl FnMut(u64, u64),
    mut report: impl FnMut(&MatrixReport),
) -> Result<Vec<u8>> {
    let mut b = CairnBuilder::new();
    for (k, v) in &src.metadata {
        // GGUF's own layout keys do not describe the .cairn file.
        if k != "general.alignment" {
            b.meta(k, v.clone());
        }
    }
    for (k, v) in extra {
        b.meta(k, v.clone());
    }
    let total: u64 = src.tensors.iter().filter(|t| is_linear(t)).map(|t| t.n_elements()).sum();
    let mut done = 0u64;
    for t in &src.tensors {
        let host = src.tensor(&t.name, &t.dims)?;
        if !is_linear(t) {
            b.tensor(&t.name, &t.dims, t.ty, host.bytes().to_vec()).map_err(|e| Error::model(e.to_string()))?;
            continue;
        }
        let (cols, rows) = (host.cols(), host.rows());
        let w = host.to_f32()?;
        let (ty, tried) = match quant {
            Quant::F16 => (GgmlType::F16, vec![]),
            Quant::Fine { bits, group } | Quant::Rtn { bits, group } => (fine_type(bits, group)?, vec![]),
            Quant::FineAuto { bits } => {
                let base =
                    FineType::new(bits, bits == 8, fine::AUTO_GROUPS[0]).map_err(|e| Error::input(e.to_string()))?;
                let c = fine::choose_group(base, fine::AUTO_THRESHOLD, |ft| {
                    w.par_chunks(cols).map(|r| fine::row_error(ft, Rounding::Search, r)).sum()
                });
                (GgmlType::Fine(base.with_group(c.group).map_err(|e| Error::model(e.to_string()))?), c.errors)
            }
        };
        let rounding = if matches!(quant, Quant::Rtn { .. }) { Rounding::MinMax } else { Rounding::Search };
        let rb = ty.row_bytes(cols as u64).map_err(|e| Error::model(format!("{}: {e}", t.name)))? as usize;
        let mut out = vec![0u8; rb * rows];
        out.par_chunks_mut(rb)
            .zip(w.par_chunks(cols))
            .try_for_each(|(dst, src)| match ty {
                GgmlType::Fine(ft) => fine::quantize_row(ft, rounding, src, dst),
                _ => quant::quantize(ty, src, dst),
            })
            .map_err(|e| Error::model(format!("{}: {e}", t.name)))?;
        report(&MatrixReport { name: t.name.clone(), ty, tried, bytes: out.len() as u64, params: t.n_elements() });
        b.tensor(&t.name, &t.dims, ty, out).map_err(|e| Error::model(e.to_string()))?;
        done += t.n_elements();
        progress(done, total);
    }
    Ok(b.build())
}

fn fine_type(bits: u8, group: usize) -> Result<GgmlType> {
    FineType::new(bits, bits == 8, group).map(GgmlType::Fine).map_err(|e| Error::input(e.to_string()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The whole command: read `input`, convert, record provenance, write `output`
/// atomically (through a `.part` file), and print each matrix's choice.
pub fn run(input: &Path, quant: Quant, output: &Path) -> Result<()> {
    let src = ModelFile::open(input)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let bytes = std::fs::read(input).map_err(io(input))?;
    let sha = hex(&Sha256::digest(&bytes));
    drop(bytes);

    let name = input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (group, threshold) = match quant {
        Quant::Fine { group, .. } | Quant::Rtn { group, .. } => (group as u32, 0.0),
        Quant::FineAuto { .. } => (0, fine::AUTO_THRESHOLD as f32),
        Quant::F16 => (0, 0.0),
    };
    let provenance = vec![
        ("cairn.source.file".to_string(), MetaValue::String(name)),
        ("cairn.source.sha256".to_string(), MetaValue::String(sha)),
        ("cairn.convert.quant".to_string(), MetaValue::String(quant.label())),
        ("cairn.convert.group".to_string(), MetaValue::U32(group)),
        ("cairn.convert.threshold".to_string(), MetaValue::F32(threshold)),
        ("cairn.convert.tool".to_string(), MetaValue::String(format!("cairn {}", env!("CARGO_PKG_VERSION")))),
    ];

    let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {percent}% eta {eta}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("converting to {}", quant.label()));
    let (mut lin_bytes, mut lin_params) = (0u64, 0u64);
    let data = convert(
        &src,
        quant,
        &provenance,
        |done, total| {
            bar.set_length(total.max(1));
            bar.set_position(done);
        },
        |m| {
            lin_bytes += m.bytes;
            lin_params += m.params;
            let tried: Vec<String> = m.tried.iter().map(|(g, e)| format!("g{g} {e:.3e}")).collect();
            let why = if tried.is_empty() { String::new() } else { format!("  (squared error: {})", tried.join(", ")) };
            let line =
                format!("{:<28} {:<10} {:>6.3} bits/param{why}", m.name, m.ty.to_string(), bits(m.bytes, m.params));
            // A hidden bar (stderr not a terminal) would swallow the line.
            if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
        },
    )?;
    bar.finish_and_clear();

    let part = output.with_extension("cairn.part");
    let mut f = std::fs::File::create(&part).map_err(io(&part))?;
    f.write_all(&data).map_err(io(&part))?;
    f.sync_all().map_err(io(&part))?;
    std::fs::rename(&part, output).map_err(io(output))?;
    eprintln!(
        "wrote {} ({} bytes): linear weights {} bytes, {:.3} bits/param",
        output.display(),
        data.len(),
        lin_bytes,
        bits(lin_bytes, lin_params)
    );
    Ok(())
}

fn bits(bytes: u64, params: u64) -> f64 {
    bytes as f64 * 8.0 / params.max(1) as f64
}
