// FineQuant / RTN rows (formats/src/fine.rs): groups of FQ_GROUP values along the row,
// the last one possibly shorter; each group is its header (f16 scale d, then an f16
// minimum m when asymmetric) followed by its codes, 32 values (one run) at a time:
//   int8: one i8 q per value, d·q
//   int4: byte j = u[j] | u[j + 16] << 4, d·u + m (symmetric: d·(u − 8))
//   int2: bits 2k..2k+2 of byte j = u[j + 8k], d·u + m
//   int3: int2's 8 bytes (the low bits), then a u32 whose bit j is bit 2 of u[j]
// Run b of a row starts at a byte computed from b alone (headers sit before their own
// codes). Width, symmetry and group size are pipeline constants (one pipeline per
// FineQuant type), so the offsets fold into shifts and the other widths compile away.
override FQ_BITS: u32;
override FQ_SYM: bool;
override FQ_GROUP: u32;

// Values 4g..4g+3 of the row starting at byte `row`.
fn dq4(row: u32, g: u32) -> vec4<f32> {
    let hdr = select(4u, 2u, FQ_SYM);
    let run_bytes = 4u * FQ_BITS;
    let per = FQ_GROUP / 32u;
    let b = g >> 3u;
    let j = g & 7u;
    let h = row + (b / per) * (hdr + per * run_bytes);
    let c = h + hdr + (b % per) * run_bytes;
    let d = f16_at(h);
    if (FQ_BITS == 8u) {
        return sbytes4(ld32(c + 4u * j)) * d;
    }
    var q: u32;
    if (FQ_BITS == 4u) {
        q = (ld32(c + 4u * (j & 3u)) >> (4u * (j >> 2u))) & 0x0f0f0f0fu;
    } else {
        // Values 4j..4j+3 are bytes 4(j & 1)..+4, bit pair j >> 1.
        q = (ld32(c + 4u * (j & 1u)) >> (2u * (j >> 1u))) & 0x03030303u;
        if (FQ_BITS == 3u) {
            q |= spread4(ld32(c + 8u) >> (4u * j)) >> 2u;
        }
    }
    if (FQ_SYM) {
        return (bytes4(q) - 8.0) * d;
    }
    return bytes4(q) * d + f16_at(h + 2u);
}
