//! ggml tensor types: ids as stored in GGUF, block geometry, and row sizes.

use crate::error::{Error, Result};
use crate::fine::FineType;

/// A tensor storage type: every type ggml knows, plus Cairn's own FineQuant family
/// ([`GgmlType::Fine`], only ever stored in `.cairn` files). The discriminant is the id
/// GGUF stores. Every ggml type is listed so that a file using one Cairn cannot run still
/// parses (and the error can say which tensor and type is the problem);
/// [`GgmlType::is_supported`] says which have kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2K = 10,
    Q3K = 11,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
    Q8K = 15,
    IQ2XXS = 16,
    IQ2XS = 17,
    IQ3XXS = 18,
    IQ1S = 19,
    IQ4NL = 20,
    IQ3S = 21,
    IQ2S = 22,
    IQ4XS = 23,
    I8 = 24,
    I16 = 25,
    I32 = 26,
    I64 = 27,
    F64 = 28,
    IQ1M = 29,
    BF16 = 30,
    TQ1_0 = 34,
    TQ2_0 = 35,
    /// FineQuant / round-to-nearest integer codes with per-group scales (see [`crate::fine`]).
    Fine(FineType) = 0x1000,
}

/// Values per super-block of the k-quants.
pub const QK_K: usize = 256;

impl GgmlType {
    pub fn from_id(id: u32) -> Result<Self> {
        use GgmlType::*;
        Ok(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            16 => IQ2XXS,
            17 => IQ2XS,
            18 => IQ3XXS,
            19 => IQ1S,
            20 => IQ4NL,
            21 => IQ3S,
            22 => IQ2S,
            23 => IQ4XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            _ => return Err(Error::UnknownType(id)),
        })
    }

    /// The id GGUF stores; [`GgmlType::Fine`] has none there and reports 0x1000.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            IQ2XXS => 16,
            IQ2XS => 17,
            IQ3XXS => 18,
            IQ1S => 19,
            IQ4NL => 20,
            IQ3S => 21,
            IQ2S => 22,
            IQ4XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            Fine(_) => 0x1000,
        }
    }

    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            IQ2XXS => "IQ2_XXS",
            IQ2XS => "IQ2_XS",
            IQ3XXS => "IQ3_XXS",
            IQ1S => "IQ1_S",
            IQ4NL => "IQ4_NL",
            IQ3S => "IQ3_S",
            IQ2S => "IQ2_S",
            IQ4XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            Fine(ft) => match (ft.bits(), ft.sym()) {
                (2, _) => "INT2",
                (3, _) => "INT3",
                (4, false) => "INT4",
                (4, true) => "INT4S",
                _ => "INT8",
            },
        }
    }

    /// (values per block, bytes per block), as ggml defines them.
    pub fn block_geometry(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 => (1, 4),
            F16 => (1, 2),
            BF16 => (1, 2),
            F64 => (1, 8),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2K => (QK_K, 84),
            Q3K => (QK_K, 110),
            Q4K => (QK_K, 144),
            Q5K => (QK_K, 176),
            Q6K => (QK_K, 210),
            Q8K => (QK_K, 292),
            IQ2XXS => (QK_K, 66),
            IQ2XS => (QK_K, 74),
            IQ3XXS => (QK_K, 98),
            IQ1S => (QK_K, 50),
            IQ4NL => (32, 18),
            IQ3S => (QK_K, 110),
            IQ2S => (QK_K, 82),
            IQ4XS => (QK_K, 136),
            IQ1M => (QK_K, 56),
            TQ1_0 => (QK_K, 54),
            TQ2_0 => (QK_K, 66),
            // Runs of 32 codes; group headers come on top (see `row_bytes`).
            Fine(ft) => (crate::fine::RUN, ft.run_bytes()),
        }
    }

    pub fn block_size(self) -> usize {
        self.block_geometry().0
    }

    pub fn type_size(self) -> usize {
        self.block_geometry().1
    }

    /// Whether Cairn has dequantization and dot-product kernels for this type.
    pub fn is_supported(self) -> bool {
        use GgmlType::*;
        matches!(self, F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q4K | Q5K | Q6K | Fine(_))
    }

    /// The ggml type with the same bytes, where one exists: a FineQuant asymmetric
    /// int4 group of 32 is a Q4_1 block, a symmetric int8 group of 32 a Q8_0 block.
    /// Backends run the canonical type (and its repacked kernels).
    pub fn canonical(self) -> GgmlType {
        match self {
            GgmlType::Fine(ft) if ft.group() == crate::fine::RUN => match (ft.bits(), ft.sym()) {
                (4, false) => GgmlType::Q4_1,
                (8, true) => GgmlType::Q8_0,
                _ => self,
            },
            _ => self,
        }
    }

    /// Bytes of a row of `n` values, or an error when `n` is not a whole number of blocks
    /// or the size overflows.
    pub fn row_bytes(self, n: u64) -> Result<u64> {
        if let GgmlType::Fine(ft) = self {
            return ft.row_bytes(n);
        }
        let (bs, ts) = self.block_geometry();
        if !n.is_multiple_of(bs as u64) {
            return Err(Error::invalid(alloc_fmt(self, n)));
        }
        (n / bs as u64).checked_mul(ts as u64).ok_or_else(|| Error::invalid("tensor size overflows"))
    }
}

fn alloc_fmt(ty: GgmlType, n: u64) -> std::string::String {
    alloc::format!("row of {n} values is not a whole number of {} blocks of {}", ty.name(), ty.block_size())
}

impl core::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            GgmlType::Fine(ft) => write!(f, "{ft}"),
            _ => f.write_str(self.name()),
        }
    }
}
