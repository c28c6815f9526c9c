// Byte access into the GGUF bytes of a weight, bound as `W: array<u32>`. Blocks of
// 18, 34 or 210 bytes start at even offsets only, so 32-bit loads need 2-byte alignment.

fn ld8(b: u32) -> u32 {
    return (W[b >> 2u] >> ((b & 3u) * 8u)) & 0xffu;
}

// `b` even.
fn ld16(b: u32) -> u32 {
    return (W[b >> 2u] >> ((b & 2u) * 8u)) & 0xffffu;
}

// `b` even: the four bytes b..b+4, little-endian.
fn ld32(b: u32) -> u32 {
    let i = b >> 2u;
    if ((b & 3u) == 0u) {
        return W[i];
    }
    return (W[i] >> 16u) | (W[i + 1u] << 16u);
}

fn f16_at(b: u32) -> f32 {
    return unpack2x16float(ld16(b)).x;
}
