//! Robustness of the GGUF reader: files built with `GgufBuilder` round-trip exactly;
//! every truncation, random mutation and hostile count gives an `Err` (never a panic);
//! whatever parses keeps every tensor inside the file; and no input makes the parser
//! allocate much more than its own size (a counting allocator measures it).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use cairn_formats::quant::{dequantize, dot, quantize};
use cairn_formats::{Error, GgmlType, Gguf, GgufBuilder, MetaArray, MetaValue};
use proptest::prelude::*;

// ---------------------------------------------------------------- allocation meter

/// Counts, per thread, the largest single allocation and the total bytes requested, so a
/// test can bound what one `Gguf::parse` call allocates (other test threads do not
/// interfere: the counters are thread-local).
struct Meter;

thread_local! {
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static TOTAL: Cell<usize> = const { Cell::new(0) };
}

fn note(n: usize) {
    let _ = PEAK.try_with(|p| p.set(p.get().max(n)));
    let _ = TOTAL.try_with(|t| t.set(t.get().saturating_add(n)));
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static METER: Meter = Meter;

/// What `f` allocated on this thread: (largest single allocation, total bytes).
fn metered<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    PEAK.with(|p| p.set(0));
    TOTAL.with(|t| t.set(0));
    let out = f();
    (out, PEAK.with(Cell::get), TOTAL.with(Cell::get))
}

/// The most `parse` may allocate for an input of `len` bytes. Every count is bounded by
/// the bytes left, so allocations are linear in the input: the worst case is an array of
/// one-byte values, each becoming a `MetaValue`, and lossy UTF-8 decoding of a string of
/// invalid bytes (3 output bytes per input byte, copied once more into the `String`).
fn alloc_bound(len: usize) -> usize {
    4 * std::mem::size_of::<MetaValue>() * len + 64 * 1024
}

/// Parse `bytes`, checking the allocation bound and, when it parses, every invariant a
/// caller relies on. Returns whether it parsed.
fn parse_checked(bytes: &[u8]) -> Result<Gguf<'_>, Error> {
    let t = Instant::now();
    let (r, peak, total) = metered(|| Gguf::parse(bytes));
    let elapsed = t.elapsed();
    let bound = alloc_bound(bytes.len());
    assert!(peak <= bound, "one allocation of {peak} bytes for a {}-byte input", bytes.len());
    assert!(total <= 2 * bound, "{total} bytes allocated in all for a {}-byte input", bytes.len());
    assert!(elapsed < Duration::from_secs(2), "parse of {} bytes took {elapsed:?}", bytes.len());
    match &r {
        Ok(g) => assert_invariants(g, bytes),
        Err(e) => assert_one_line(e),
    }
    r
}

/// An error is one short line, whatever the file's keys and names hold.
fn assert_one_line(e: &Error) {
    let m = e.to_string();
    assert!(!m.is_empty() && !m.contains('\n') && m.len() <= 1024, "error text {m:?}");
}

/// What every successfully parsed file guarantees.
fn assert_invariants(g: &Gguf, bytes: &[u8]) {
    assert!((2..=3).contains(&g.version));
    assert!(g.alignment.is_power_of_two(), "alignment {}", g.alignment);
    assert_eq!(g.data_offset % g.alignment, 0);
    if !g.tensors.is_empty() {
        assert!(g.data_offset <= bytes.len() as u64);
    }
    let mut names = std::collections::HashSet::new();
    for t in &g.tensors {
        assert!(names.insert(t.name.as_str()), "tensor {} twice", t.name);
        assert!((1..=4).contains(&t.dims.len()), "{}: dims {:?}", t.name, t.dims);
        let rows: u64 = t.dims[1..].iter().product();
        assert_eq!(t.size, t.ty.row_bytes(t.dims[0]).unwrap() * rows, "{}: size", t.name);
        assert!(t.offset >= g.data_offset);
        assert_eq!((t.offset - g.data_offset) % g.alignment, 0, "{}: misaligned", t.name);
        assert!(t.offset.checked_add(t.size).is_some_and(|e| e <= bytes.len() as u64), "{}: out of bounds", t.name);
        assert_eq!(g.tensor_data(t).len() as u64, t.size);
    }
}

// ---------------------------------------------------------------- generators

/// Bitwise equality of metadata values (so that NaN payloads count as preserved).
fn same(a: &MetaValue, b: &MetaValue) -> bool {
    match (a, b) {
        (MetaValue::F32(x), MetaValue::F32(y)) => x.to_bits() == y.to_bits(),
        (MetaValue::F64(x), MetaValue::F64(y)) => x.to_bits() == y.to_bits(),
        (MetaValue::Array(x), MetaValue::Array(y)) => {
            x.len() == y.len() && (0..x.len()).all(|i| same(&x.get(i).unwrap(), &y.get(i).unwrap()))
        }
        _ => a == b,
    }
}

/// A value of GGUF type `ty`; arrays nest up to `depth` more levels. GGUF arrays are
/// homogeneous (one element type), so each array draws its element type first.
fn value_of(ty: u32, depth: u32) -> BoxedStrategy<MetaValue> {
    match ty {
        0 => any::<u8>().prop_map(MetaValue::U8).boxed(),
        1 => any::<i8>().prop_map(MetaValue::I8).boxed(),
        2 => any::<u16>().prop_map(MetaValue::U16).boxed(),
        3 => any::<i16>().prop_map(MetaValue::I16).boxed(),
        4 => any::<u32>().prop_map(MetaValue::U32).boxed(),
        5 => any::<i32>().prop_map(MetaValue::I32).boxed(),
        6 => any::<u32>().prop_map(|b| MetaValue::F32(f32::from_bits(b))).boxed(),
        7 => any::<bool>().prop_map(MetaValue::Bool).boxed(),
        8 => "\\PC{0,12}".prop_map(MetaValue::String).boxed(),
        9 => {
            let elem = if depth == 0 {
                (0u32..=11).prop_map(|t| if t >= 9 { t + 1 } else { t }).boxed()
            } else {
                (0u32..=12).boxed()
            };
            elem.prop_flat_map(move |t| {
                proptest::collection::vec(value_of(t, depth.saturating_sub(1)), 0..6).prop_map(MetaValue::array)
            })
            .boxed()
        }
        10 => any::<u64>().prop_map(MetaValue::U64).boxed(),
        11 => any::<i64>().prop_map(MetaValue::I64).boxed(),
        _ => any::<u64>().prop_map(|b| MetaValue::F64(f64::from_bits(b))).boxed(),
    }
}

fn any_value() -> BoxedStrategy<MetaValue> {
    (0u32..=12).prop_flat_map(|t| value_of(t, 2)).boxed()
}

const ALL_TYPES: [GgmlType; 31] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
    GgmlType::Q8K,
    GgmlType::IQ2XXS,
    GgmlType::IQ2XS,
    GgmlType::IQ3XXS,
    GgmlType::IQ1S,
    GgmlType::IQ4NL,
    GgmlType::IQ3S,
    GgmlType::IQ2S,
    GgmlType::IQ4XS,
    GgmlType::I8,
    GgmlType::I16,
    GgmlType::I32,
    GgmlType::I64,
    GgmlType::F64,
    GgmlType::IQ1M,
    GgmlType::BF16,
    GgmlType::TQ1_0,
    GgmlType::TQ2_0,
];

/// A tensor: type, dims (`dims[0]` a whole number of blocks) and seed of its bytes.
#[derive(Debug, Clone)]
struct TensorSpec {
    ty: GgmlType,
    dims: Vec<u64>,
    seed: u64,
}

fn tensor_spec() -> impl Strategy<Value = TensorSpec> {
    (proptest::sample::select(&ALL_TYPES[..]), 1u64..=2, proptest::collection::vec(1u64..=3, 0..=3), any::<u64>())
        .prop_map(|(ty, blocks, outer, seed)| {
            let mut dims = vec![blocks * ty.block_size() as u64];
            dims.extend(outer);
            TensorSpec { ty, dims, seed }
        })
}

/// A whole file's content: metadata (keys drawn so they never name `general.alignment`),
/// the alignment (absent, or stored as u32 or u64) and the tensors.
#[derive(Debug, Clone)]
struct FileSpec {
    metadata: Vec<(String, MetaValue)>,
    alignment: Option<(u64, bool)>,
    tensors: Vec<TensorSpec>,
}

fn file_spec(max_tensors: usize) -> impl Strategy<Value = FileSpec> {
    (
        proptest::collection::vec(("[a-z_]{1,8}(\\.[a-z_]{1,8}){0,2}", any_value()), 0..8),
        proptest::option::of((proptest::sample::select(vec![1u64, 2, 8, 32, 64, 256]), any::<bool>())),
        proptest::collection::vec(tensor_spec(), 0..=max_tensors),
    )
        .prop_map(|(metadata, alignment, tensors)| FileSpec { metadata, alignment, tensors })
}

fn bytes_from_seed(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 56) as u8
        })
        .collect()
}

fn tensor_bytes(t: &TensorSpec) -> Vec<u8> {
    let rows: u64 = t.dims[1..].iter().product();
    let n = t.ty.row_bytes(t.dims[0]).unwrap() * rows;
    bytes_from_seed(t.seed, n as usize)
}

fn build(spec: &FileSpec) -> Vec<u8> {
    let mut b = GgufBuilder::new();
    for (k, v) in &spec.metadata {
        b = b.meta(k, v.clone());
    }
    if let Some((a, wide)) = spec.alignment {
        b = b.meta("general.alignment", if wide { MetaValue::U64(a) } else { MetaValue::U32(a as u32) });
    }
    for (i, t) in spec.tensors.iter().enumerate() {
        b = b.tensor(&format!("t{i}.weight"), &t.dims, t.ty, tensor_bytes(t)).unwrap();
    }
    b.build()
}

/// Encoded size of a metadata value, worked out from the spec (not from the builder).
fn encoded_len(v: &MetaValue) -> usize {
    match v {
        MetaValue::U8(_) | MetaValue::I8(_) | MetaValue::Bool(_) => 1,
        MetaValue::U16(_) | MetaValue::I16(_) => 2,
        MetaValue::U32(_) | MetaValue::I32(_) | MetaValue::F32(_) => 4,
        MetaValue::U64(_) | MetaValue::I64(_) | MetaValue::F64(_) => 8,
        MetaValue::String(s) => 8 + s.len(),
        MetaValue::Array(a) => 4 + 8 + (0..a.len()).map(|i| encoded_len(&a.get(i).unwrap())).sum::<usize>(),
    }
}

/// The shortest prefix of the file that still holds everything it describes: the end of
/// the last tensor's data, or (no tensors) the end of the metadata.
fn required_len(spec: &FileSpec, g: &Gguf) -> usize {
    if g.tensors.is_empty() {
        let mut n = 4 + 4 + 8 + 8;
        for (k, v) in &spec.metadata {
            n += 8 + k.len() + 4 + encoded_len(v);
        }
        if let Some((_, wide)) = spec.alignment {
            n += 8 + "general.alignment".len() + 4 + if wide { 8 } else { 4 };
        }
        n
    } else {
        g.tensors.iter().map(|t| (t.offset + t.size) as usize).max().unwrap()
    }
}

// ---------------------------------------------------------------- mutations

/// One edit of a file's bytes. Positions are taken modulo the length.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Xor(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    /// Overwrite 8 bytes with a value chosen to hit count and offset checks.
    Word(usize, u64),
    /// Overwrite 4 bytes (type ids, dimension counts, u32 values).
    Half(usize, u32),
    Truncate(usize),
}

const INTERESTING: [u64; 14] =
    [0, 1, 2, 3, 4, 7, 13, 255, 0xFFFF_FFFF, 1 << 32, 1 << 60, i64::MAX as u64, u64::MAX - 30, u64::MAX];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Set(p, b)),
        2 => (any::<usize>(), 1u8..=255).prop_map(|(p, b)| Mutation::Xor(p, b)),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(p, b)| Mutation::Insert(p, b)),
        1 => (any::<usize>(), 1usize..32).prop_map(|(p, n)| Mutation::Delete(p, n)),
        3 => (any::<usize>(), proptest::sample::select(&INTERESTING[..])).prop_map(|(p, v)| Mutation::Word(p, v)),
        2 => (any::<usize>(), proptest::sample::select(&[0u32, 1, 5, 9, 12, 13, 100, 0xFFFF_FFFF][..]))
            .prop_map(|(p, v)| Mutation::Half(p, v)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let at = |p: usize| p % bytes.len();
    match m {
        Mutation::Set(p, b) => {
            let i = at(*p);
            bytes[i] = *b;
        }
        Mutation::Xor(p, b) => {
            let i = at(*p);
            bytes[i] ^= *b;
        }
        Mutation::Insert(p, b) => {
            let i = at(*p);
            bytes.splice(i..i, b.iter().copied());
        }
        Mutation::Delete(p, n) => {
            let i = at(*p);
            let end = (i + n).min(bytes.len());
            bytes.drain(i..end);
        }
        Mutation::Word(p, v) => {
            let i = at(*p);
            let end = (i + 8).min(bytes.len());
            bytes[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
        }
        Mutation::Half(p, v) => {
            let i = at(*p);
            let end = (i + 4).min(bytes.len());
            bytes[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
        }
        Mutation::Truncate(p) => {
            let n = at(*p);
            bytes.truncate(n);
        }
    }
}

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Everything the builder writes is read back exactly.
    #[test]
    fn round_trip(spec in file_spec(5)) {
        let bytes = build(&spec);
        let g = parse_checked(&bytes).expect("a built file parses");
        prop_assert_eq!(g.version, 3);
        let alignment = spec.alignment.map_or(32, |a| a.0);
        prop_assert_eq!(g.alignment, alignment);
        let mut want = spec.metadata.clone();
        if let Some((a, wide)) = spec.alignment {
            want.push(("general.alignment".into(), if wide { MetaValue::U64(a) } else { MetaValue::U32(a as u32) }));
        }
        prop_assert_eq!(g.metadata.len(), want.len());
        for ((k, v), (wk, wv)) in g.metadata.iter().zip(&want) {
            prop_assert_eq!(k, wk);
            prop_assert!(same(v, wv), "{}: read {:?}, wrote {:?}", k, v, wv);
        }
        prop_assert_eq!(g.tensors.len(), spec.tensors.len());
        let mut end = g.data_offset;
        for (i, (t, s)) in g.tensors.iter().zip(&spec.tensors).enumerate() {
            prop_assert_eq!(&t.name, &format!("t{i}.weight"));
            prop_assert_eq!(&t.dims, &s.dims);
            prop_assert_eq!(t.ty, s.ty);
            prop_assert_eq!(t.n_elements(), s.dims.iter().product::<u64>());
            // Laid out in order, each at the next aligned offset.
            prop_assert_eq!(t.offset, end.div_ceil(alignment) * alignment);
            end = t.offset + t.size;
            prop_assert_eq!(g.tensor_data(t), &tensor_bytes(s)[..]);
            prop_assert!(std::ptr::eq(g.tensor(&t.name).unwrap(), t));
        }
        for (k, v) in &want {
            prop_assert!(same(g.get(k).unwrap(), v) || want.iter().filter(|(k2, _)| k2 == k).count() > 1);
        }
    }

    /// Cutting a file anywhere before the end of what it describes is an error (never a
    /// panic); cutting only trailing padding still parses, with the same content.
    #[test]
    fn every_truncation_is_an_error(spec in file_spec(3)) {
        let bytes = build(&spec);
        let full = parse_checked(&bytes).unwrap();
        let need = required_len(&spec, &full);
        prop_assert!(need <= bytes.len());
        for n in 0..bytes.len() {
            let r = parse_checked(&bytes[..n]);
            if n < need {
                prop_assert!(r.is_err(), "a {n}-byte prefix of {} (needs {need}) parsed", bytes.len());
            } else {
                let g = r.unwrap_or_else(|e| panic!("{n}-byte prefix (needs {need}): {e}"));
                prop_assert_eq!(&g.tensors, &full.tensors);
                prop_assert_eq!(g.metadata.len(), full.metadata.len());
            }
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// Random edits of a valid file never panic, stay within the allocation bound, and
    /// anything that still parses keeps its tensors inside the file.
    #[test]
    fn mutated_files_never_panic(
        spec in file_spec(4),
        edits in proptest::collection::vec(mutation(), 1..6),
    ) {
        let mut bytes = build(&spec);
        for m in &edits {
            apply(&mut bytes, m);
        }
        let _ = parse_checked(&bytes);
    }

    /// Arbitrary bytes behind a valid magic and version.
    #[test]
    fn random_bodies_never_panic(version in 2u32..=3, body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&body);
        let _ = parse_checked(&bytes);
    }

}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Quantized blocks with some bytes changed decode without panicking, dot agrees with
    /// dequantize, and an edit changes only the values of the block it falls in.
    #[test]
    fn mutated_blocks_decode_locally(
        ty in proptest::sample::select(ALL_TYPES.iter().copied().filter(|t| t.is_supported()).collect::<Vec<_>>()),
        seed in any::<u64>(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let (bs, ts) = ty.block_geometry();
        let n_blocks = 4usize.max(512 / bs);
        let n = n_blocks * bs;
        let src: Vec<f32> = bytes_from_seed(seed, n).iter().map(|&b| (b as f32 - 128.0) / 37.0).collect();
        let mut blocks = vec![0u8; n_blocks * ts];
        quantize(ty, &src, &mut blocks).unwrap();
        let mut before = vec![0f32; n];
        dequantize(ty, &blocks, &mut before).unwrap();

        let mut touched = vec![false; n_blocks];
        for &(p, b) in &edits {
            let i = p % blocks.len();
            blocks[i] = b;
            touched[i / ts] = true;
        }
        let mut after = vec![0f32; n];
        dequantize(ty, &blocks, &mut after).unwrap();
        for (k, t) in touched.iter().enumerate() {
            if !t {
                let (x, y) = (&before[k * bs..(k + 1) * bs], &after[k * bs..(k + 1) * bs]);
                prop_assert!(
                    x.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ty}: editing other blocks changed block {k}"
                );
            }
        }
        let x: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) / 4.0).collect();
        let d = dot(ty, &blocks, &x).unwrap();
        let exact: f64 = after.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
        let mag: f64 = after.iter().zip(&x).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
        if mag.is_finite() && mag < 1e30 {
            prop_assert!((d as f64 - exact).abs() <= 1e-4 * mag + 1e-30, "{ty}: dot {d} vs {exact}");
        }
    }
}

/// The meter really sees what parsing allocates (so the bounds above are not vacuous).
#[test]
fn allocation_meter_measures_parse() {
    let (v, peak, total) = metered(|| vec![0u8; 123_456]);
    assert_eq!(v.len(), 123_456);
    assert!(peak >= 123_456 && total >= 123_456, "{peak} {total}");
    let array = MetaValue::array(vec![MetaValue::U8(1); 10_000]);
    let bytes = GgufBuilder::new().meta("k", array).build();
    let (r, peak, _) = metered(|| Gguf::parse(&bytes));
    assert!(r.is_ok());
    assert!(peak >= 10_000 * std::mem::size_of::<MetaValue>(), "{peak}");
    assert!(peak <= alloc_bound(bytes.len()));
}

/// A vocabulary (strings, f32 scores, i32 types) is held packed: parsing allocates less
/// than twice its encoded size, where one `MetaValue` per element would take 4×.
#[test]
fn vocabulary_arrays_parse_packed() {
    let n = 100_000;
    let tokens: Vec<String> = (0..n).map(|i| format!("tok{i}")).collect();
    let bytes = GgufBuilder::new()
        .meta("tokens", MetaValue::strings(&tokens))
        .meta("scores", MetaValue::array((0..n).map(|i| MetaValue::F32(-(i as f32))).collect()))
        .meta("types", MetaValue::array(vec![MetaValue::I32(1); n]))
        .build();
    let (g, _, total) = metered(|| Gguf::parse(&bytes));
    let g = g.unwrap();
    assert!(total < 2 * bytes.len(), "{total} bytes allocated for {} encoded", bytes.len());
    let (t, s, ty) = (g.get("tokens").unwrap(), g.get("scores").unwrap(), g.get("types").unwrap());
    assert!(matches!(t, MetaValue::Array(MetaArray::Strings(_))), "{:?}", t.as_array().map(MetaArray::len));
    assert!(matches!(s, MetaValue::Array(MetaArray::F32(_))) && matches!(ty, MetaValue::Array(MetaArray::I32(_))));
    let (t, s, ty) = (t.as_array().unwrap(), s.as_array().unwrap(), ty.as_array().unwrap());
    assert_eq!((t.len(), t.str(0), t.str(n - 1), t.str(n)), (n, Some("tok0"), Some("tok99999"), None));
    assert_eq!(t.strs().unwrap(), tokens.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!((s.f64(7), ty.i64(7), s.str(7), ty.f64(n)), (Some(-7.0), Some(1), None, None));
    // The packed form is the canonical one: built element by element, it compares equal.
    let one_by_one = MetaValue::array(tokens.iter().map(|t| MetaValue::String(t.clone())).collect());
    assert_eq!(g.get("tokens"), Some(&one_by_one));
}

#[test]
fn values_display_short() {
    assert_eq!(MetaValue::U32(4).to_string(), "4");
    assert_eq!(MetaValue::String("gpt2".into()).to_string(), "gpt2");
    assert_eq!(MetaValue::strings(["a", "b"]).to_string(), r#"["a", "b"]"#);
    let long = MetaValue::array((0..240).map(|i| MetaValue::F64(i as f64 / 2.0)).collect());
    assert_eq!(long.to_string(), "[0, 0.5, 1, 1.5, 2, 2.5, … (240 values)]");
    assert_eq!(MetaValue::array(vec![]).to_string(), "[]");
}

// ---------------------------------------------------------------- hostile headers

/// Hand-assembled GGUF bytes, for headers the builder would never write.
#[derive(Default)]
struct Raw(Vec<u8>);

impl Raw {
    fn header(n_tensors: u64, n_kv: u64) -> Raw {
        Raw::default().bytes(b"GGUF").u32(3).u64(n_tensors).u64(n_kv)
    }
    fn bytes(mut self, b: &[u8]) -> Raw {
        self.0.extend_from_slice(b);
        self
    }
    fn u32(self, v: u32) -> Raw {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(self, v: u64) -> Raw {
        self.bytes(&v.to_le_bytes())
    }
    fn str(self, s: &str) -> Raw {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    /// A tensor directory entry.
    fn tensor(self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Raw {
        let mut r = self.str(name).u32(dims.len() as u32);
        for &d in dims {
            r = r.u64(d);
        }
        r.u32(ty).u64(offset)
    }
    /// Zero padding to `a`, then `n` data bytes.
    fn data(mut self, a: usize, n: usize) -> Vec<u8> {
        self.0.resize(self.0.len().div_ceil(a) * a + n, 0);
        self.0
    }
    fn done(self) -> Vec<u8> {
        self.0
    }
}

/// Parses `bytes` expecting an error, fast and with no large allocation; returns its text.
fn hostile(bytes: &[u8]) -> String {
    let t = Instant::now();
    let (r, peak, _) = metered(|| Gguf::parse(bytes));
    let elapsed = t.elapsed();
    let e = match r {
        Ok(g) => panic!("hostile input parsed: {:?}", g.tensors),
        Err(e) => e,
    };
    assert!(peak <= 4096 + 64 * bytes.len(), "{peak}-byte allocation for {} input bytes ({e})", bytes.len());
    assert!(elapsed < Duration::from_millis(200), "took {elapsed:?} to reject ({e})");
    assert_one_line(&e);
    e.to_string()
}

#[test]
fn huge_metadata_count_errors_fast() {
    for n in [1u64 << 60, u64::MAX, 1 << 32, 1000] {
        let msg = hostile(&Raw::header(0, n).str("a").u32(0).bytes(&[1]).done());
        assert!(msg.contains("metadata count"), "{msg}");
    }
}

#[test]
fn huge_tensor_count_errors_fast() {
    for n in [1u64 << 60, u64::MAX, 1 << 20] {
        let msg = hostile(&Raw::header(n, 0).tensor("t", &[32], 0, 0).data(32, 128));
        assert!(msg.contains("tensor count"), "{msg}");
    }
}

#[test]
fn huge_string_lengths_error() {
    // Key length.
    // (Zero padding after each, so that the counts themselves pass their bounds.)
    assert!(hostile(&Raw::header(0, 1).u64(u64::MAX).bytes(&[b'a'; 32]).done()).contains("metadata key"));
    assert!(hostile(&Raw::header(0, 1).u64(1 << 60).bytes(&[b'a'; 32]).done()).contains("metadata key"));
    // String value length.
    hostile(&Raw::header(0, 1).str("k").u32(8).u64(u64::MAX).bytes(b"xyz").done());
    hostile(&Raw::header(0, 1).str("k").u32(8).u64(4).bytes(b"xyz").done());
    // Tensor name length.
    assert!(hostile(&Raw::header(1, 0).u64(u64::MAX - 1).bytes(&[b't'; 64]).done()).contains("tensor name"));
}

#[test]
fn huge_array_lengths_error() {
    for elem in [0u32, 4, 7, 8, 9, 10, 12] {
        for n in [u64::MAX, 1 << 60, 1 << 33, 100] {
            let raw = Raw::header(0, 1).str("k").u32(9).u32(elem).u64(n).bytes(&[0; 40]).done();
            hostile(&raw);
        }
    }
    // Nested: an array of arrays, the inner one claiming 2^60 strings.
    hostile(&Raw::header(0, 1).str("k").u32(9).u32(9).u64(1).u32(8).u64(1 << 60).bytes(&[0; 64]).done());
    // Unknown element type.
    hostile(&Raw::header(0, 1).str("k").u32(9).u32(13).u64(1).bytes(&[0; 16]).done());
}

#[test]
fn deep_array_nesting_is_refused_without_recursing_deeply() {
    // 100 000 levels would overflow the stack of an unbounded recursive reader.
    let mut raw = Raw::header(0, 1).str("k").u32(9);
    for _ in 0..100_000 {
        raw = raw.u32(9).u64(1);
    }
    let msg = hostile(&raw.u32(0).u64(0).done());
    assert!(msg.contains("nested"), "{msg}");
    // Moderate nesting, as built by the writer, is fine.
    let mut v = MetaValue::array(vec![MetaValue::U8(7)]);
    for _ in 0..5 {
        v = MetaValue::array(vec![v]);
    }
    let bytes = GgufBuilder::new().meta("k", v.clone()).build();
    assert!(same(Gguf::parse(&bytes).unwrap().get("k").unwrap(), &v));
}

#[test]
fn corrupt_keys_and_names_stay_out_of_error_lines() {
    // A key of 100 000 bytes of text and newlines, followed by an unknown value type.
    let key: String = "token\n".repeat(100_000 / 6);
    let msg = hostile(&Raw::header(0, 1).str(&key).u32(99).u64(0).done());
    assert!(msg.contains("unknown value type 99") && msg.contains("token\\n"), "{msg}");
    assert!(msg.len() < 300 && !msg.contains('\n'), "{msg}");
    // The same for a tensor name, in each later check that names it.
    let name: String = "w\r\n".repeat(50_000);
    for raw in [
        Raw::header(1, 0).tensor(&name, &[32], 0, 1).data(32, 128),
        Raw::header(1, 0).tensor(&name, &[32], 99, 0).data(32, 128),
        Raw::header(1, 0).tensor(&name, &[32, 1 << 40], 0, 0).data(32, 128),
    ] {
        let msg = hostile(&raw);
        assert!(msg.len() < 300 && !msg.contains('\n'), "{msg}");
    }
    // Clean short names are shown as they are.
    let msg = hostile(&Raw::header(1, 0).tensor("blk.0.attn_q.weight", &[32], 99, 0).data(32, 128));
    assert!(msg.contains("tensor blk.0.attn_q.weight: unknown type id 99"), "{msg}");
}

#[test]
fn bad_scalars_error() {
    hostile(&Raw::header(0, 1).str("k").u32(13).u64(0).done()); // unknown value type
    hostile(&Raw::header(0, 1).str("k").u32(u32::MAX).u64(0).done());
    hostile(&Raw::header(0, 1).str("k").u32(7).bytes(&[2]).done()); // bool byte 2
    hostile(&Raw::header(0, 1).str("k").u32(10).bytes(&[0; 7]).done()); // u64 cut short
}

#[test]
fn bad_magic_version_and_tiny_inputs_error() {
    assert_eq!(hostile(b""), Error::Truncated { what: "magic".into(), offset: 0 }.to_string());
    hostile(b"GGU");
    hostile(b"GGUF");
    hostile(b"GGUF\x03\x00\x00");
    assert!(hostile(b"GGML\x03\x00\x00\x00").contains("not a GGUF file"));
    assert!(hostile(b"hello, world\n").contains("not a GGUF file"));
    for v in [0u32, 1, 4, u32::MAX] {
        let msg = hostile(&Raw::default().bytes(b"GGUF").u32(v).u64(0).u64(0).done());
        assert!(msg.contains("version"), "{msg}");
    }
    // Header cut inside the counts.
    hostile(&Raw::default().bytes(b"GGUF").u32(3).u64(0).done());
}

#[test]
fn bad_dimension_counts_error() {
    for n_dims in [0u32, 5, 64, u32::MAX] {
        let raw = Raw::header(1, 0).str("t").u32(n_dims).u64(32).u64(1).u32(0).u64(0).data(32, 4096);
        let msg = hostile(&raw);
        assert!(msg.contains("dimensions"), "{msg}");
    }
}

#[test]
fn overflowing_sizes_error() {
    let cases: &[&[u64]] = &[
        &[1 << 32, 1 << 32, 2], // element count overflows
        &[u64::MAX],            // 4 * u64::MAX bytes
        &[1 << 62],             // 2^64 bytes
        &[32, u64::MAX, 2],     // product overflows after the row size
        &[1 << 40, 1 << 30],    // no overflow, just far past the end
        &[u64::MAX / 4 + 1, 1], // row size exactly overflows
        &[u64::MAX, u64::MAX, u64::MAX, u64::MAX],
    ];
    for dims in cases {
        for ty in [0u32, 1, 2, 12] {
            let bytes = Raw::header(1, 0).tensor("t", dims, ty, 0).data(32, 1024);
            let msg = hostile(&bytes);
            assert!(msg.contains("tensor t"), "{dims:?} {ty}: {msg}");
        }
    }
    // A row that is not a whole number of blocks.
    let msg = hostile(&Raw::header(1, 0).tensor("t", &[33, 1], 2, 0).data(32, 1024));
    assert!(msg.contains("blocks"), "{msg}");
}

#[test]
fn bad_offsets_error() {
    // 32 F32 values = 128 bytes, in a data section of 256 bytes.
    let file = |offset: u64| Raw::header(1, 0).tensor("t", &[32], 0, offset).data(32, 256);
    assert!(Gguf::parse(&file(0)).is_ok());
    assert!(Gguf::parse(&file(128)).is_ok());
    for offset in [160u64, 256, 1 << 40, u64::MAX - 63, !31] {
        let msg = hostile(&file(offset));
        assert!(msg.contains("tensor t"), "offset {offset}: {msg}");
    }
    for offset in [1u64, 16, 31, 33, u64::MAX] {
        let msg = hostile(&file(offset));
        assert!(msg.contains("aligned") || msg.contains("truncated"), "offset {offset}: {msg}");
    }
    // Tensors and no room for a data section at all.
    hostile(&Raw::header(1, 0).tensor("t", &[1], 0, 0).done());
}

#[test]
fn bad_alignments_error() {
    let file = |v: MetaValue| GgufBuilder::new().meta("general.alignment", v).build();
    for a in [0u64, 3, 24, 1 << 21, 1 << 40, u64::MAX] {
        // Written by hand: the builder would pad to a huge alignment.
        let msg = hostile(&Raw::header(0, 1).str("general.alignment").u32(10).u64(a).done());
        assert!(msg.contains("alignment"), "{a}: {msg}");
    }
    hostile(&file(MetaValue::U32(0)));
    hostile(&file(MetaValue::I32(-32)));
    hostile(&file(MetaValue::String("32".into())));
    hostile(&file(MetaValue::F32(32.0)));
    // Alignment 0 with a tensor: no division by zero.
    let raw = Raw::header(1, 1).str("general.alignment").u32(4).u32(0).tensor("t", &[1], 0, 0).data(32, 64);
    hostile(&raw);
    // Unusual but valid alignments parse.
    for a in [1u64, 2, 64, 1 << 20] {
        let b = GgufBuilder::new()
            .meta("general.alignment", MetaValue::U64(a))
            .tensor("t", &[3], GgmlType::F32, vec![1; 12])
            .unwrap()
            .build();
        let g = Gguf::parse(&b).unwrap();
        assert_eq!(g.alignment, a);
        assert_eq!(g.data_offset % a, 0);
    }
}

#[test]
fn unknown_types_and_duplicates_error() {
    for ty in [4u32, 5, 31, 36, 1000, u32::MAX] {
        let msg = hostile(&Raw::header(1, 0).tensor("t", &[32], ty, 0).data(32, 1024));
        assert!(msg.contains("unknown type"), "{ty}: {msg}");
    }
    let raw = Raw::header(2, 0).tensor("t", &[8], 0, 0).tensor("t", &[8], 0, 32).data(32, 64);
    assert!(hostile(&raw).contains("twice"));
}

#[test]
fn unsupported_but_known_types_parse() {
    // A type without kernels is still a valid file: the runtime reports it by name.
    let b = GgufBuilder::new().tensor("t", &[256, 2], GgmlType::Q2K, vec![0; 168]).unwrap().build();
    let g = Gguf::parse(&b).unwrap();
    assert_eq!(g.tensors[0].ty, GgmlType::Q2K);
    let mut out = vec![0f32; 512];
    assert_eq!(dequantize(GgmlType::Q2K, g.tensor_data(&g.tensors[0]), &mut out), Err(Error::UnsupportedType("Q2_K")));
}

#[test]
fn zero_sized_tensors_and_empty_files() {
    // A header with nothing else.
    let bytes = Raw::header(0, 0).done();
    let g = Gguf::parse(&bytes).unwrap();
    assert!(g.metadata.is_empty() && g.tensors.is_empty());
    // A zero dimension gives an empty tensor, anywhere in bounds.
    let bytes = Raw::header(1, 0).tensor("t", &[0, 5], 0, 0).data(32, 0);
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.tensors[0].size, 0);
    assert!(g.tensor_data(&g.tensors[0]).is_empty());
}

#[test]
fn builder_rejects_wrong_data_sizes() {
    assert!(GgufBuilder::new().tensor("t", &[32], GgmlType::F32, vec![0; 127]).is_err());
    assert!(GgufBuilder::new().tensor("t", &[33], GgmlType::Q4_0, vec![0; 18]).is_err());
}
