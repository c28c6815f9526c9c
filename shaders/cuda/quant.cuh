// One decoder per storage type (the layouts of shaders/quant/*.wgsl and formats/src/).
// Every decoder works on pieces of 8 values: piece q of a row is values 8q..8q+7, which
// never straddles a block (every block size is a multiple of 32) nor a q8 activation
// block (quantize.cu).
//
// The integer types describe a piece as its 8 codes, packed as signed bytes in two
// words, and an affine map w = a·(code − off) + b written the way the CPU decoders
// (formats/src/quant/) write it, so that an embedding row decodes to the same f32 bits.
// From that one description come the f32 decode (`dq8`, for the tiled matmul and the
// embeddings) and the integer dot with 8-bit activations (`qdot8`, for the decode
// matvec, with __dp4a). F32 and F16 decode directly.
#pragma once
#include "common.cuh"

// Codes of one piece and their map to values.
struct Codes {
    unsigned u0, u1; // codes 0..3 and 4..7, one signed byte each
    float a, b;
    int off;
};

// (scale, min) of sub-block `s` of a Q4_K/Q5_K block from its 12 packed bytes `sc`, as
// ggml's get_scale_min_k4.
__device__ __forceinline__ void scale_min_k4(const u8* sc, unsigned s, float& scale, float& min) {
    if (s < 4) {
        scale = (float)(sc[s] & 63);
        min = (float)(sc[s + 4] & 63);
    } else {
        scale = (float)((sc[s + 4] & 15) | ((sc[s - 4] >> 6) << 4));
        min = (float)((sc[s + 4] >> 4) | ((sc[s] >> 6) << 4));
    }
}

// Q4_0 (18 B per 32): d, qs[16]; value i < 16 the low nibble of qs[i], i + 16 the high
// one; w = (q − 8)·d.
struct Q4_0 {
    __device__ void codes(const u8* row, unsigned q, Codes& c) const {
        const u8* blk = row + (q >> 2) * 18;
        unsigned j = q & 3, sh = 4 * (j >> 1);
        const u8* p = blk + 2 + 8 * (j & 1);
        c.u0 = (ld32(p) >> sh) & 0x0f0f0f0fu;
        c.u1 = (ld32(p + 4) >> sh) & 0x0f0f0f0fu;
        c.a = f16_at(blk);
        c.b = 0.0f;
        c.off = 8;
    }
};

// Q4_1 (20 B): d, m, qs[16] as Q4_0; w = q·d + m.
struct Q4_1 {
    __device__ void codes(const u8* row, unsigned q, Codes& c) const {
        const u8* blk = row + (q >> 2) * 20;
        unsigned j = q & 3, sh = 4 * (j >> 1);
        const u8* p = blk + 4 + 8 * (j & 1);
        c.u0 = (ld32(p) >> sh) & 0x0f0f0f0fu;
        c.u1 = (ld32(p + 4) >> sh) & 0x0f0f0f0fu;
        c.a = f16_at(blk);
        c.b = f16_at(blk + 2);
        c.off = 0;
    }
};

// Q5_0 (22 B): d, qh (bit i: the 5th bit of value i), qs[16] as Q4_0; w = (q − 16)·d.
struct Q5_0 {
    __device__ void codes(const u8* row, unsigned q, Codes& c) const {
        const u8* blk = row + (q >> 2) * 22;
        unsigned j = q & 3, sh = 4 * (j >> 1);
        const u8* p = blk + 6 + 8 * (j & 1);
        unsigned h = ld32(blk + 2) >> (8 * j);
        c.u0 = ((ld32(p) >> sh) & 0x0f0f0f0fu) | spread4(h);
        c.u1 = ((ld32(p + 4) >> sh) & 0x0f0f0f0fu) | spread4(h >> 4);
        c.a = f16_at(blk);
        c.b = 0.0f;
        c.off = 16;
    }
};

// Q5_1 (24 B): d, m, qh, qs[16]; w = q·d + m.
struct Q5_1 {
    __device__ void codes(const u8* row, unsigned q, Codes& c) const {
        const u8* blk = row + (q >> 2) * 24;
        unsigned j = q & 3, sh = 4 * (j >> 1);
        const u8* p = blk + 8 + 8 * (j & 1);
        unsigned h = ld32(blk + 4) >> (8 * j);
        c.u0 = ((ld32(p) >> sh) & 0x0f0f0f0fu) | spread4(h);
        c.u1 = ((ld32(p + 4) >> sh) & 0x0f0f0f0fu) | spread4(h >> 4);
        c.a = f16_at(blk);
        c.b = f16_at(blk + 2);
        c.off = 0;
    }
};

// Q8_0 (34 B): d, qs[32] as i8; w = q·d.
struct Q8_0 {
    __device__ void codes(const u8* row, unsigned q, Codes& c) const {
        const u8* blk = row + (q >> 2) * 34;
        const u8* p = blk + 2 + 8 * (q & 3);
        c.u0 = ld32(p);
        c.u1 = ld32(p + 4);
        c.a = f16_at(blk);
        c.b = 0.0f;
        c.off = 0;
    }
};

// Q4_K (144 B per 256): d, dmin, scales[12], qs[128]; chunk c (64 values) uses
// qs[32c..], low nibbles for sub-block 2c, high for 2c + 1; w = (d·scale)·q − dmin·min.
struct Q4_K {
    __device__ void codes(const u8* row, unsigned q, Codes& c) const {
        const u8* blk = row + (q >> 5) * 144;
        unsigned jq = q & 31, s = jq >> 2, hi = s & 1, l = 8 * (jq & 3);
        const u8* p = blk + 16 + 32 * (s >> 1) + l;
        c.u0 = (ld32(p) >> (4 * hi)) & 0x0f0f0f0fu;
        c.u1 = (ld32(p + 4) >> (4 * hi)) & 0x0f0f0f0fu;
        float sc, mn;
        scale_min_k4(blk + 4, s, sc, mn);
        c.a = __fmul_rn(f16_at(blk), sc);
        c.b = -__fmul_rn(f16_at(blk + 2), mn);
        c.off = 0;
    }
};

// Q5_K (176 B): d, dmin, scales[12], qh[32], qs[128]; as Q4_K plus a 5th bit: bit s of
// qh[l] for value l of sub-block s.
struct Q5_K {
    __device__ void codes(const u8* row, unsigned q, Codes& c) const {
        const u8* blk = row + (q >> 5) * 176;
        unsigned jq = q & 31, s = jq >> 2, hi = s & 1, l = 8 * (jq & 3);
        const u8* p = blk + 48 + 32 * (s >> 1) + l;
        const u8* h = blk + 16 + l;
        c.u0 = ((ld32(p) >> (4 * hi)) & 0x0f0f0f0fu) | (((ld32(h) >> s) & 0x01010101u) << 4);
        c.u1 = ((ld32(p + 4) >> (4 * hi)) & 0x0f0f0f0fu) | (((ld32(h + 4) >> s) & 0x01010101u) << 4);
        float sc, mn;
        scale_min_k4(blk + 4, s, sc, mn);
        c.a = __fmul_rn(f16_at(blk), sc);
        c.b = -__fmul_rn(f16_at(blk + 2), mn);
        c.off = 0;
    }
};

// Q6_K (210 B): ql[128], qh[64], scales[16] (i8), d. Half h (128 values) uses ql[64h..],
// qh[32h..]; for l < 32 the values 32k + l take their low 4 bits from ql[l + 32(k & 1)]
// (nibble k >> 1) and their top 2 from bits 2k of qh[l]; w = (d·scale)·(q − 32).
struct Q6_K {
    __device__ void codes(const u8* row, unsigned q, Codes& c) const {
        const u8* blk = row + (q >> 5) * 210;
        unsigned v = 8 * (q & 31), h = v >> 7, k = (v >> 5) & 3, l = v & 31;
        const u8* pl = blk + 64 * h + l + 32 * (k & 1);
        const u8* ph = blk + 128 + 32 * h + l;
        unsigned sl = 4 * (k >> 1), sh = 2 * k;
        c.u0 = ((ld32(pl) >> sl) & 0x0f0f0f0fu) | (((ld32(ph) >> sh) & 0x03030303u) << 4);
        c.u1 = ((ld32(pl + 4) >> sl) & 0x0f0f0f0fu) | (((ld32(ph + 4) >> sh) & 0x03030303u) << 4);
        float sc = (float)(signed char)blk[192 + 8 * h + l / 16 + 2 * k];
        c.a = __fmul_rn(f16_at(blk + 208), sc);
        c.b = 0.0f;
        c.off = 32;
    }
};

// FineQuant / RTN rows (formats/src/fine.rs): groups of `group` values, the last one
// possibly shorter, each its header (f16 d, then f16 m when asymmetric) before its codes,
// 32 values (a run) at a time; so run r starts at a byte computed from r alone.
//   int8: i8 q, d·q;  int4: byte j = u[j] | u[j + 16] << 4, d·u + m (symmetric d·u − 8d)
//   int2: bits 2k..2k+2 of byte j = u[j + 8k];  int3: int2's 8 bytes, then a u32 whose
//   bit j is bit 2 of u[j].
struct Fine {
    unsigned bits, sym, group;

    __device__ void codes(const u8* row, unsigned q, Codes& c) const {
        unsigned hdr = sym ? 2 : 4, rb = 4 * bits, per = group / 32;
        unsigned r = q >> 2, j = q & 3;
        const u8* h = row + (r / per) * (hdr + per * rb);
        const u8* p = h + hdr + (r % per) * rb;
        float d = f16_at(h);
        c.a = d;
        c.off = 0;
        c.b = sym ? 0.0f : f16_at(h + 2);
        if (bits == 8) {
            c.u0 = ld32(p + 8 * j);
            c.u1 = ld32(p + 8 * j + 4);
        } else if (bits == 4) {
            unsigned sh = 4 * (j >> 1);
            p += 8 * (j & 1);
            c.u0 = (ld32(p) >> sh) & 0x0f0f0f0fu;
            c.u1 = (ld32(p + 4) >> sh) & 0x0f0f0f0fu;
            if (sym) c.b = -(8.0f * d);
        } else {
            c.u0 = (ld32(p) >> (2 * j)) & 0x03030303u;
            c.u1 = (ld32(p + 4) >> (2 * j)) & 0x03030303u;
            if (bits == 3) {
                unsigned hb = ld32(p + 8) >> (8 * j);
                c.u0 |= spread4(hb) >> 2;
                c.u1 |= spread4(hb >> 4) >> 2;
            }
        }
    }
};

struct F32 {};
struct F16 {};

// Values 8q..8q+7 of a row of an integer type, with the CPU decoders' roundings (no
// contraction into fma, which would change the last bit).
template <class D> __device__ __forceinline__ void dq8(const D& dec, const u8* row, unsigned q, unsigned, float v[8]) {
    Codes c;
    dec.codes(row, q, c);
    for (int i = 0; i < 8; i++) {
        unsigned u = i < 4 ? c.u0 >> (8 * i) : c.u1 >> (8 * (i - 4));
        v[i] = __fadd_rn(__fmul_rn(c.a, (float)((int)(signed char)u - c.off)), c.b);
    }
}

// F32 and F16 rows may end mid-piece (`k` any size): values past `k` read as zero.
__device__ __forceinline__ void dq8(const F32&, const u8* row, unsigned q, unsigned k, float v[8]) {
    const float* p = (const float*)row;
    for (unsigned i = 0; i < 8; i++) v[i] = 8 * q + i < k ? p[8 * q + i] : 0.0f;
}

__device__ __forceinline__ void dq8(const F16&, const u8* row, unsigned q, unsigned k, float v[8]) {
    const unsigned short* p = (const unsigned short*)row;
    for (unsigned i = 0; i < 8; i++) v[i] = 8 * q + i < k ? f16_to_f32(p[8 * q + i]) : 0.0f;
}

// Bytes of one block of 8-bit activations (quantize.cu): f32 scale, then 32 i8.
#define Q8_BLOCK 36

// Σ w·x over piece q of a row, x given as 8-bit activations `xq` of the same row width.
template <class D> __device__ __forceinline__ float qdot8(const D& dec, const u8* row, unsigned q, const u8* xq) {
    Codes c;
    dec.codes(row, q, c);
    const u8* xb = xq + (q >> 2) * Q8_BLOCK;
    float dx = *(const float*)xb;
    const int* xv = (const int*)(xb + 4 + 8 * (q & 3));
    int x0 = xv[0], x1 = xv[1];
    int s = __dp4a((int)c.u0, x0, __dp4a((int)c.u1, x1, 0));
    int sx = __dp4a(0x01010101, x0, __dp4a(0x01010101, x1, 0));
    return dx * (c.a * (float)(s - c.off * sx) + c.b * (float)sx);
}
