//! The CUDA backend: the kernels of `shaders/cuda/` behind the [`super::Backend`] trait.
//! It is written once against [`device::Device`], so the same code runs on the driver
//! (feature `cuda`, through cudarc, kernels compiled by NVRTC for the device) and on the
//! host emulator ([`emu`], the same sources compiled as C++), which is how its arithmetic
//! is tested against the CPU backend on machines without a GPU. Launch configurations
//! are the contract of `shaders/cuda/README.md`.

pub mod device;
#[cfg(feature = "cuda")]
pub mod driver;
#[cfg(unix)]
pub mod emu;
pub mod source;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cairn_formats::GgmlType;

use self::device::{Arg, DevPtr, Device, Launch};
use super::{AttnParams, Backend, KvLayer, RopeStyle};
use crate::bitstack::StackWeight;
use crate::error::{Error, Result};
use crate::weights::HostTensor;

/// Threads of the 1-D kernels' blocks.
const BLOCK: u32 = 256;
/// Rows of W per matvec block (one warp each) and per matmul tile; tokens per tile.
const MATVEC_ROWS: usize = 4;
const TILE_ROWS: usize = 64;
const TILE_TOKENS: usize = 64;
/// Bytes of one quantized block of 32 activations (`quantize_q8`: f32 scale, 32 × i8).
const Q8_BLOCK_BYTES: usize = 36;
/// The attention kernel keeps one head's query in shared memory.
const MAX_HEAD_DIM: usize = 256;
/// The BitStack kernels keep a row's U in registers.
const MAX_RANK: usize = 64;
/// A sliding-window ring holds the window plus this many positions, so a batch of that
/// many queries is stored before any of them reads an overwritten slot.
const KV_CHUNK: usize = 256;
/// CUDA's limit on a grid's y and z sizes.
const MAX_GRID_Y: usize = 65535;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The kernel-name suffix of a storage type the kernels read in place.
fn type_suffix(ty: GgmlType) -> Option<&'static str> {
    Some(match ty {
        GgmlType::F32 => "f32",
        GgmlType::F16 => "f16",
        GgmlType::Q4_0 => "q4_0",
        GgmlType::Q4_1 => "q4_1",
        GgmlType::Q5_0 => "q5_0",
        GgmlType::Q5_1 => "q5_1",
        GgmlType::Q8_0 => "q8_0",
        GgmlType::Q4K => "q4_k",
        GgmlType::Q5K => "q5_k",
        GgmlType::Q6K => "q6_k",
        GgmlType::Fine(_) => "fine",
        _ => return None,
    })
}

/// Every kernel name this backend may launch: what `shaders/cuda/` must define.
pub fn launched_kernels() -> Vec<String> {
    let mut names: Vec<String> = [
        "quantize_q8",
        "rms_norm",
        "rope",
        "swiglu",
        "geglu",
        "add",
        "kv_store",
        "attend",
        "stack_matvec",
        "stack_matmul",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for t in ["f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k", "fine"] {
        for op in ["matvec", "matmul", "embed"] {
            names.push(format!("{op}_{t}"));
        }
    }
    names
}

/// Float activations (f32/f16 weights) or 8-bit ones through `quantize_q8` (the rest).
fn reads_q8(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::F32 | GgmlType::F16)
}

/// Trailing kernel arguments of a FineQuant type: width, symmetry, group size.
fn fine_args(ty: GgmlType) -> Vec<Arg> {
    match ty {
        GgmlType::Fine(ft) => {
            vec![Arg::U32(u32::from(ft.bits())), Arg::U32(u32::from(ft.sym())), Arg::U32(ft.group() as u32)]
        }
        _ => Vec::new(),
    }
}

/// Freed activation buffers by size: a forward pass allocates the same shapes every
/// step, and device allocation is far slower than reuse.
struct Pool {
    dev: Arc<dyn Device>,
    free: Mutex<HashMap<usize, Vec<DevPtr>>>,
}

impl Pool {
    fn take(&self, bytes: usize) -> Result<Buf> {
        let bytes = bytes.max(4);
        let reused = lock(&self.free).get_mut(&bytes).and_then(|v| v.pop());
        let ptr = match reused {
            Some(p) => p,
            None => self.dev.alloc(bytes)?,
        };
        Ok(Buf { ptr, bytes, dev: self.dev.clone(), owner: Owner::Device })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (_, ptrs) in lock(&self.free).drain() {
            for p in ptrs {
                self.dev.free(p);
            }
        }
    }
}

/// Who gives a buffer's memory back.
enum Owner {
    /// Activations: back to the pool for the next tensor of that size.
    Pool(Arc<Pool>),
    /// Weights and caches: freed.
    Device,
    /// The mapped model file, registered with the device and read in place.
    Host,
    /// Nothing (an allocation that failed; its error is pending).
    None,
}

struct Buf {
    ptr: DevPtr,
    bytes: usize,
    dev: Arc<dyn Device>,
    owner: Owner,
}

impl Drop for Buf {
    fn drop(&mut self) {
        match &self.owner {
            Owner::Pool(pool) => lock(&pool.free).entry(self.bytes).or_default().push(self.ptr),
            Owner::Device => self.dev.free(self.ptr),
            Owner::Host | Owner::None => {}
        }
    }
}

pub struct CudaTensor {
    buf: Buf,
    rows: usize,
    cols: usize,
}

pub struct CudaWeight {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    buf: Option<Buf>,
    stack: Option<CudaStack>,
}

/// A BitStack matrix: device copies of its active blocks, synced to the active count
/// at each use (blocks that joined are uploaded, blocks that left are freed).
struct CudaStack {
    src: Arc<StackWeight>,
    levels: Mutex<Vec<Buf>>,
}

/// One layer's cache: f16 keys and values, `slots` positions (the whole context, or a
/// ring for a sliding-window layer), allocated by the layer's first attention call.
pub struct CudaKv {
    bufs: Option<(Buf, Buf)>,
    len: usize,
    capacity: usize,
    width: usize,
    slots: usize,
    window: Option<usize>,
}

impl KvLayer for CudaKv {
    fn keepable(&self, len: usize) -> usize {
        super::ring_keepable(len, self.len, self.slots, self.window)
    }
    fn truncate(&mut self, len: usize) -> usize {
        self.len = self.keepable(len);
        self.len
    }
}

/// (pos0, rows, head_dim, base bits) of a RoPE table.
type RopeKey = (usize, usize, usize, u32);

pub struct CudaBackend {
    dev: Arc<dyn Device>,
    pool: Arc<Pool>,
    /// The first error of work whose op cannot return one; [`Backend::status`] reports it.
    error: Mutex<Option<String>>,
    /// The last RoPE table, keyed by (pos0, rows, head_dim, base bits).
    rope: Mutex<Option<(RopeKey, Arc<Buf>)>>,
    /// Weights read in place from the mapped file: the storage types checked so far, or
    /// `None` once a check failed (then every weight is uploaded).
    in_place: Mutex<Option<Vec<GgmlType>>>,
}

impl CudaBackend {
    /// The backend on `dev` (the driver's device, or the emulator).
    pub fn on(dev: Arc<dyn Device>) -> Self {
        let pool = Arc::new(Pool { dev: dev.clone(), free: Mutex::default() });
        CudaBackend {
            dev,
            pool,
            error: Mutex::default(),
            rope: Mutex::default(),
            in_place: Mutex::new(Some(Vec::new())),
        }
    }

    /// The first CUDA device, its kernels compiled by NVRTC (cached on disk).
    #[cfg(feature = "cuda")]
    pub fn new() -> Result<Self> {
        Ok(Self::on(Arc::new(driver::CudaDevice::open(0)?)))
    }

    /// Builds without the `cuda` feature have no driver to open.
    #[cfg(not(feature = "cuda"))]
    pub fn new() -> Result<Self> {
        Err(Error::input("this build of cairn has no CUDA backend (built without the `cuda` feature)"))
    }

    fn note_error(&self, msg: String) {
        lock(&self.error).get_or_insert(msg);
    }

    fn take_error(&self) -> Result<()> {
        match lock(&self.error).take() {
            Some(e) => Err(Error::model(format!("cuda: {e}"))),
            None => Ok(()),
        }
    }

    fn alloc(&self, bytes: usize) -> Result<Buf> {
        let mut b = self.pool.take(bytes)?;
        b.owner = Owner::Pool(self.pool.clone());
        Ok(b)
    }

    /// An activation tensor; a failed allocation is noted and gives an empty one, so the
    /// op's caller sees the error at [`Backend::status`].
    fn tensor(&self, rows: usize, cols: usize) -> CudaTensor {
        match self.alloc(rows * cols * 4) {
            Ok(buf) => CudaTensor { buf, rows, cols },
            Err(e) => {
                self.note_error(e.to_string());
                CudaTensor { buf: Buf { ptr: 0, bytes: 0, dev: self.dev.clone(), owner: Owner::None }, rows, cols }
            }
        }
    }

    /// Weight memory (freed, not pooled, when the weight goes).
    fn upload_weight(&self, name: &str, bytes: &[u8]) -> Result<Buf> {
        let ptr = self
            .dev
            .alloc(bytes.len().max(4))
            .map_err(|e| Error::model(format!("cuda: no device memory for {name}: {e}")))?;
        let buf = Buf { ptr, bytes: bytes.len().max(4), dev: self.dev.clone(), owner: Owner::Device };
        self.dev.upload(ptr, bytes)?;
        Ok(buf)
    }

    /// `t` read in place from the mapped file where the device can (an integrated GPU).
    /// llama.cpp turned its integrated-GPU host-memory path off after it corrupted
    /// output, so the first weight of each storage type is checked: a matvec reading it
    /// in place must equal, bit for bit, the same matvec on an uploaded copy; any
    /// difference turns the path off for good, with a warning, and weights are uploaded.
    fn in_place(&self, t: &HostTensor) -> Option<Buf> {
        let checked = lock(&self.in_place).clone()?;
        let ptr = match self.dev.map_host(t.bytes()) {
            Ok(Some(p)) => p,
            Ok(None) => return None,
            Err(e) => {
                log::warn!("cuda: {e}: uploading the weights instead");
                *lock(&self.in_place) = None;
                return None;
            }
        };
        let host = Buf { ptr, bytes: t.bytes().len(), dev: self.dev.clone(), owner: Owner::Host };
        if checked.contains(&t.ty) {
            return Some(host);
        }
        let same = self.same_product(t, host.ptr);
        match same {
            Ok(true) => {
                if let Some(v) = lock(&self.in_place).as_mut() {
                    v.push(t.ty);
                }
                Some(host)
            }
            Ok(false) | Err(_) => {
                let why = match same {
                    Err(e) => e.to_string(),
                    _ => "results differ".to_string(),
                };
                log::warn!(
                    "cuda: {} read in place from the mapped file does not match an uploaded copy ({why}): uploading every weight instead",
                    t.name
                );
                *lock(&self.in_place) = None;
                None
            }
        }
    }

    /// Whether a matvec of `t` read at `ptr` equals one on an uploaded copy, bit for bit.
    fn same_product(&self, t: &HostTensor, ptr: DevPtr) -> Result<bool> {
        let copy = self.upload_weight(&t.name, t.bytes())?;
        let weight = |buf: Buf| CudaWeight {
            ty: t.ty,
            rows: t.rows(),
            cols: t.cols(),
            row_bytes: t.row_bytes(),
            buf: Some(buf),
            stack: None,
        };
        let mapped = weight(Buf { ptr, bytes: t.bytes().len(), dev: self.dev.clone(), owner: Owner::Host });
        let uploaded = weight(copy);
        let x: Vec<f32> = (0..t.cols()).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
        let xt = self.upload(&x, 1, t.cols());
        let a = self.to_host(self.matmul(&xt, &mapped));
        let b = self.to_host(self.matmul(&xt, &uploaded));
        self.status()?;
        Ok(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()))
    }

    fn launch(&self, name: &str, cfg: Launch, args: &[Arg]) {
        if let Err(e) = self.dev.launch(name, cfg, args) {
            self.note_error(format!("{name}: {e}"));
        }
    }

    fn elementwise(&self, kernel: &str, a: &CudaTensor, b: &CudaTensor) -> CudaTensor {
        let out = self.tensor(a.rows, a.cols);
        let len = a.rows * a.cols;
        if b.rows * b.cols != len {
            self.note_error(format!("{kernel} of {}x{} and {}x{}", a.rows, a.cols, b.rows, b.cols));
            return out;
        }
        let args = [Arg::Ptr(a.buf.ptr), Arg::Ptr(b.buf.ptr), Arg::Ptr(out.buf.ptr), Arg::U32(len as u32)];
        self.launch(kernel, Launch::linear(len, BLOCK), &args);
        out
    }

    /// `x` as 8-bit blocks for the dp4a matvecs (`k` a multiple of 32).
    fn quantize(&self, x: &CudaTensor) -> Result<Buf> {
        let (n, k) = (x.rows, x.cols);
        let xq = self.alloc(n * k / 32 * Q8_BLOCK_BYTES)?;
        let args = [Arg::Ptr(x.buf.ptr), Arg::Ptr(xq.ptr), Arg::U32(n as u32), Arg::U32(k as u32)];
        self.launch("quantize_q8", Launch::linear(n * k / 32, BLOCK), &args);
        Ok(xq)
    }

    fn sync_stack<'a>(&self, s: &'a CudaStack) -> Result<MutexGuard<'a, Vec<Buf>>> {
        let active = s.src.active();
        let mut levels = lock(&s.levels);
        levels.truncate(active);
        while levels.len() < active {
            let l = levels.len();
            let name = format!("{} (BitStack block {l})", s.src.name);
            levels.push(self.upload_weight(&name, s.src.block(l).bytes)?);
            s.src.release_block(l);
        }
        Ok(levels)
    }

    /// `x Wᵀ` for a BitStack matrix: one launch per active block, the first writing
    /// `out`, the others adding to it.
    fn stack_matmul(&self, x: &CudaTensor, s: &CudaStack, out: &CudaTensor) {
        let levels = match self.sync_stack(s) {
            Ok(l) => l,
            Err(e) => return self.note_error(e.to_string()),
        };
        let sh = s.src.shape;
        let (n, k, m) = (x.rows, sh.n, sh.m);
        if levels.is_empty() {
            // No block in use: the matrix is zero.
            if let Err(e) = self.dev.upload(out.buf.ptr, &vec![0u8; n * m * 4]) {
                self.note_error(e.to_string());
            }
            return;
        }
        let geometry = [
            Arg::U32(sh.k as u32),
            Arg::U32(sh.u_offset() as u32),
            Arg::U32(sh.v_offset() as u32),
            Arg::U32(sh.sign_row_bytes() as u32),
        ];
        for (l, block) in levels.iter().enumerate() {
            let mut args = vec![Arg::Ptr(block.ptr), Arg::Ptr(x.buf.ptr), Arg::Ptr(out.buf.ptr)];
            let (kernel, cfg) = if n == 1 {
                ("stack_matvec", Launch::grid2(m.div_ceil(MATVEC_ROWS), 1, 128))
            } else {
                args.push(Arg::U32(n as u32));
                ("stack_matmul", Launch::grid2(m.div_ceil(TILE_ROWS), n.div_ceil(TILE_TOKENS), BLOCK))
            };
            args.extend([Arg::U32(k as u32), Arg::U32(m as u32)]);
            args.extend(geometry);
            args.push(Arg::U32(u32::from(l > 0)));
            self.launch(kernel, cfg, &args);
        }
    }

    /// The (cos, sin) table of RoPE for `n` rows from `pos0`, angles in f64 as the CPU.
    fn rope_table(&self, pos0: usize, n: usize, hd: usize, base: f32) -> Result<Arc<Buf>> {
        let key = (pos0, n, hd, base.to_bits());
        if let Some((k, b)) = &*lock(&self.rope) {
            if *k == key {
                return Ok(b.clone());
            }
        }
        let t = super::rope_table(pos0, n, hd, base);
        let buf = Arc::new(self.alloc(t.len() * 4)?);
        self.dev.upload(buf.ptr, f32_bytes(&t))?;
        *lock(&self.rope) = Some((key, buf.clone()));
        Ok(buf)
    }

    /// The first attention call of a layer allocates its cache: the whole capacity, or
    /// for a sliding-window layer a ring of window + `KV_CHUNK` − 1 slots.
    fn kv_alloc(&self, kv: &mut CudaKv, window: Option<usize>) -> Result<()> {
        if kv.bufs.is_some() {
            if kv.slots < kv.capacity && window != kv.window {
                return Err(Error::model("cuda: a sliding-window cache used with another window"));
            }
            return Ok(());
        }
        kv.window = window;
        kv.slots = match window {
            Some(w) if w > 0 && w + KV_CHUNK - 1 < kv.capacity => w + KV_CHUNK - 1,
            _ => kv.capacity.max(1),
        };
        let bytes = kv.slots * kv.width * 2;
        let k = self.kv_buf(bytes)?;
        let v = self.kv_buf(bytes)?;
        kv.bufs = Some((k, v));
        Ok(())
    }

    fn kv_buf(&self, bytes: usize) -> Result<Buf> {
        let ptr = self
            .dev
            .alloc(bytes.max(4))
            .map_err(|e| Error::model(format!("cuda: no device memory for the KV cache: {e}")))?;
        Ok(Buf { ptr, bytes, dev: self.dev.clone(), owner: Owner::Device })
    }
}

/// The bytes of f32 values, as the device takes them.
fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding or invalid bit patterns; the slice covers exactly the
    // values' memory, borrowed for as long as `v`.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type Kv = CudaKv;

    fn name(&self) -> String {
        format!("cuda ({})", self.dev.name())
    }

    fn load_weight(&self, t: &HostTensor) -> Result<CudaWeight> {
        if t.dims.len() == 1 {
            // Norm weights: tiny, kept as f32 as on the CPU.
            let v = t.to_f32()?;
            let buf = self.upload_weight(&t.name, f32_bytes(&v))?;
            return Ok(CudaWeight {
                ty: GgmlType::F32,
                rows: 1,
                cols: v.len(),
                row_bytes: v.len() * 4,
                buf: Some(buf),
                stack: None,
            });
        }
        let (rows, cols) = (t.rows(), t.cols());
        if type_suffix(t.ty).is_none() {
            return Err(Error::model(format!("cuda: {}: no kernels for {:?} weights", t.name, t.ty)));
        }
        if reads_q8(t.ty) && !cols.is_multiple_of(32) {
            return Err(Error::model(format!("cuda: {}: rows of {cols} values are not a multiple of 32", t.name)));
        }
        if rows.div_ceil(TILE_ROWS) > u32::MAX as usize || rows > u32::MAX as usize {
            return Err(Error::model(format!("cuda: {}: {rows} rows exceed one launch", t.name)));
        }
        let buf = match self.in_place(t) {
            // The mapped pages are the weights now: they stay.
            Some(b) => b,
            None => {
                let b = self.upload_weight(&t.name, t.bytes())?;
                // The device copy replaces the mapping's pages.
                t.release_pages();
                b
            }
        };
        Ok(CudaWeight { ty: t.ty, rows, cols, row_bytes: t.row_bytes(), buf: Some(buf), stack: None })
    }

    fn load_stack(&self, w: &Arc<StackWeight>) -> Result<CudaWeight> {
        // Dense copies stay the CPU's (a budget counts them); these kernels run the levels.
        w.set_dense_builder(super::cpu::bitstack::dense_copy);
        let s = w.shape;
        if s.k > MAX_RANK {
            return Err(Error::model(format!(
                "cuda: BitStack matrix {}: rank {} exceeds the kernel's {MAX_RANK} (use --backend cpu)",
                w.name, s.k
            )));
        }
        let stack = CudaStack { src: w.clone(), levels: Mutex::default() };
        // The blocks active now go up at load, so a device out of memory shows here.
        drop(self.sync_stack(&stack)?);
        Ok(CudaWeight {
            ty: cairn_formats::bitstack::BLOCK_TYPE,
            rows: s.m,
            cols: s.n,
            row_bytes: 0,
            buf: None,
            stack: Some(stack),
        })
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> CudaTensor {
        assert_eq!(data.len(), rows * cols, "upload: shape does not match data");
        let t = self.tensor(rows, cols);
        if !data.is_empty() && t.buf.bytes > 0 {
            if let Err(e) = self.dev.upload(t.buf.ptr, f32_bytes(data)) {
                self.note_error(e.to_string());
            }
        }
        t
    }

    fn to_host(&self, x: CudaTensor) -> Vec<f32> {
        let mut v = vec![0f32; x.rows * x.cols];
        if v.is_empty() || x.buf.bytes == 0 {
            return v;
        }
        // SAFETY: as in `f32_bytes`, mutably: any bytes are a valid f32.
        let bytes = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * 4) };
        if let Err(e) = self.dev.download(x.buf.ptr, bytes) {
            // Reported by `status`; the caller gets values of the right shape.
            self.note_error(e.to_string());
            v.fill(f32::NAN);
        }
        v
    }

    fn rows(&self, x: &CudaTensor, start: usize, n: usize) -> CudaTensor {
        let out = self.tensor(n, x.cols);
        let bytes = n * x.cols * 4;
        if bytes > 0 && out.buf.bytes > 0 {
            if let Err(e) = self.dev.copy(out.buf.ptr, x.buf.ptr + (start * x.cols * 4) as u64, bytes) {
                self.note_error(e.to_string());
            }
        }
        out
    }

    fn concat(&self, parts: &[CudaTensor]) -> CudaTensor {
        let cols = parts.first().map_or(0, |p| p.cols);
        assert!(parts.iter().all(|p| p.cols == cols), "concat: parts of different widths");
        let out = self.tensor(parts.iter().map(|p| p.rows).sum(), cols);
        let mut at = 0u64;
        for p in parts {
            let bytes = p.rows * cols * 4;
            if bytes > 0 && out.buf.bytes > 0 {
                if let Err(e) = self.dev.copy(out.buf.ptr + at, p.buf.ptr, bytes) {
                    self.note_error(e.to_string());
                }
            }
            at += bytes as u64;
        }
        out
    }

    fn embed(&self, table: &CudaWeight, ids: &[u32], scale: f32) -> Result<CudaTensor> {
        let Some(buf) = &table.buf else {
            return Err(Error::model("cuda: an embedding table cannot be a BitStack matrix"));
        };
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= table.rows) {
            return Err(Error::input(format!("token id {id} is outside the vocabulary of {}", table.rows)));
        }
        let suffix = type_suffix(table.ty).ok_or_else(|| Error::model("cuda: embedding of an unsupported type"))?;
        let dim = table.cols;
        let out = self.tensor(ids.len(), dim);
        let idbuf = self.alloc(ids.len() * 4)?;
        // SAFETY: u32 values as bytes, as in `f32_bytes`.
        let id_bytes = unsafe { std::slice::from_raw_parts(ids.as_ptr().cast::<u8>(), ids.len() * 4) };
        self.dev.upload(idbuf.ptr, id_bytes)?;
        let mut args = vec![
            Arg::Ptr(buf.ptr),
            Arg::Ptr(idbuf.ptr),
            Arg::Ptr(out.buf.ptr),
            Arg::U32(ids.len() as u32),
            Arg::U32(dim as u32),
            Arg::U32(table.row_bytes as u32),
            Arg::F32(scale),
        ];
        args.extend(fine_args(table.ty));
        self.launch(&format!("embed_{suffix}"), Launch::linear(ids.len() * dim, BLOCK), &args);
        self.take_error()?;
        Ok(out)
    }

    fn matmul(&self, x: &CudaTensor, w: &CudaWeight) -> CudaTensor {
        let (n, k, m) = (x.rows, x.cols, w.rows);
        let out = self.tensor(n, m);
        if k != w.cols {
            self.note_error(format!("matmul of {n}x{k} by a weight of {m}x{}", w.cols));
            return out;
        }
        if n == 0 {
            return out;
        }
        if let Some(s) = &w.stack {
            self.stack_matmul(x, s, &out);
            return out;
        }
        let (Some(buf), Some(suffix)) = (&w.buf, type_suffix(w.ty)) else {
            self.note_error(format!("matmul by a weight of type {:?}", w.ty));
            return out;
        };
        if n == 1 {
            let xq = if reads_q8(w.ty) {
                match self.quantize(x) {
                    Ok(b) => Some(b),
                    Err(e) => {
                        self.note_error(e.to_string());
                        return out;
                    }
                }
            } else {
                None
            };
            let xp = xq.as_ref().map_or(x.buf.ptr, |b| b.ptr);
            let mut args = vec![
                Arg::Ptr(buf.ptr),
                Arg::Ptr(xp),
                Arg::Ptr(out.buf.ptr),
                Arg::U32(k as u32),
                Arg::U32(m as u32),
                Arg::U32(w.row_bytes as u32),
            ];
            args.extend(fine_args(w.ty));
            self.launch(&format!("matvec_{suffix}"), Launch::grid2(m.div_ceil(MATVEC_ROWS), 1, 128), &args);
            return out;
        }
        // Token tiles beyond the grid's y limit go in several launches.
        let step = MAX_GRID_Y * TILE_TOKENS;
        for t0 in (0..n).step_by(step) {
            let nt = step.min(n - t0);
            let mut args = vec![
                Arg::Ptr(buf.ptr),
                Arg::Ptr(x.buf.ptr + (t0 * k * 4) as u64),
                Arg::Ptr(out.buf.ptr + (t0 * m * 4) as u64),
                Arg::U32(nt as u32),
                Arg::U32(k as u32),
                Arg::U32(m as u32),
                Arg::U32(w.row_bytes as u32),
            ];
            args.extend(fine_args(w.ty));
            let cfg = Launch::grid2(m.div_ceil(TILE_ROWS), nt.div_ceil(TILE_TOKENS), BLOCK);
            self.launch(&format!("matmul_{suffix}"), cfg, &args);
        }
        out
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaWeight, eps: f32) -> CudaTensor {
        let out = self.tensor(x.rows, x.cols);
        let wlen = w.cols;
        let Some(wb) = &w.buf else {
            self.note_error("RMSNorm by a BitStack matrix".into());
            return out;
        };
        if wlen == 0 || !x.cols.is_multiple_of(wlen) || w.ty != GgmlType::F32 {
            self.note_error(format!("RMSNorm of width {} by a weight of {wlen}", x.cols));
            return out;
        }
        let slices = x.rows * x.cols / wlen;
        let args = [
            Arg::Ptr(x.buf.ptr),
            Arg::Ptr(wb.ptr),
            Arg::Ptr(out.buf.ptr),
            Arg::U32(slices as u32),
            Arg::U32(wlen as u32),
            Arg::F32(eps),
        ];
        self.launch("rms_norm", Launch::grid2(slices, 1, BLOCK), &args);
        out
    }

    fn rope(&self, x: &mut CudaTensor, head_dim: usize, pos0: usize, base: f32, style: RopeStyle) {
        if head_dim == 0 || !head_dim.is_multiple_of(2) || !x.cols.is_multiple_of(head_dim) {
            return self.note_error(format!("RoPE of width {} with heads of {head_dim}", x.cols));
        }
        if x.rows == 0 {
            return;
        }
        let table = match self.rope_table(pos0, x.rows, head_dim, base) {
            Ok(t) => t,
            Err(e) => return self.note_error(e.to_string()),
        };
        let args = [
            Arg::Ptr(x.buf.ptr),
            Arg::Ptr(table.ptr),
            Arg::U32(x.rows as u32),
            Arg::U32(x.cols as u32),
            Arg::U32(head_dim as u32),
            Arg::U32(u32::from(style == RopeStyle::Halves)),
        ];
        self.launch("rope", Launch::linear(x.rows * x.cols / 2, BLOCK), &args);
    }

    fn swiglu(&self, gate: &CudaTensor, up: &CudaTensor) -> CudaTensor {
        self.elementwise("swiglu", gate, up)
    }

    fn geglu(&self, gate: &CudaTensor, up: &CudaTensor) -> CudaTensor {
        self.elementwise("geglu", gate, up)
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) {
        let len = x.rows * x.cols;
        if y.rows * y.cols != len {
            return self.note_error(format!("add of {}x{} and {}x{}", x.rows, x.cols, y.rows, y.cols));
        }
        // In place: each thread reads and writes only its own element.
        let args = [Arg::Ptr(x.buf.ptr), Arg::Ptr(y.buf.ptr), Arg::Ptr(x.buf.ptr), Arg::U32(len as u32)];
        self.launch("add", Launch::linear(len, BLOCK), &args);
    }

    fn status(&self) -> Result<()> {
        if let Err(e) = self.dev.sync() {
            self.note_error(e.to_string());
        }
        self.take_error()
    }

    fn kv_new(&self, n_kv_heads: usize, head_dim: usize, capacity: usize) -> Result<CudaKv> {
        if head_dim > MAX_HEAD_DIM || !head_dim.is_multiple_of(2) {
            return Err(Error::model(format!(
                "cuda: attention supports even head sizes up to {MAX_HEAD_DIM}, not {head_dim}"
            )));
        }
        Ok(CudaKv { bufs: None, len: 0, capacity, width: n_kv_heads * head_dim, slots: capacity.max(1), window: None })
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        kv: &mut CudaKv,
        pos0: usize,
        p: AttnParams,
    ) -> Result<CudaTensor> {
        super::check_append(pos0, q.rows, kv.len, kv.capacity)?;
        if p.n_kv_heads == 0
            || p.n_kv_heads * p.head_dim != kv.width
            || k.cols != kv.width
            || v.cols != kv.width
            || q.cols != p.n_heads * p.head_dim
            || !p.n_heads.is_multiple_of(p.n_kv_heads)
        {
            return Err(Error::model("cuda: attention shapes do not match the cache"));
        }
        let n = q.rows;
        self.kv_alloc(kv, p.window)?;
        let Some((kc, vc)) = &kv.bufs else { return Err(Error::model("cuda: KV cache not allocated")) };
        // A ring holds the window plus one group of queries: larger batches go a group at
        // a time (each query still sees exactly its window); the grid's y limit too.
        let ring = if kv.slots < kv.capacity { kv.slots + 1 - p.window.unwrap_or(1) } else { n.max(1) };
        let group = ring.min(MAX_GRID_Y);
        let qw = p.n_heads * p.head_dim;
        let out = self.tensor(n, qw);
        for t0 in (0..n).step_by(group.max(1)) {
            let nt = group.min(n - t0);
            let at = |t: &CudaTensor| t.buf.ptr + (t0 * t.cols * 4) as u64;
            let store = [
                Arg::Ptr(at(k)),
                Arg::Ptr(at(v)),
                Arg::Ptr(kc.ptr),
                Arg::Ptr(vc.ptr),
                Arg::U32(nt as u32),
                Arg::U32(kv.width as u32),
                Arg::U32((pos0 + t0) as u32),
                Arg::U32(kv.slots as u32),
            ];
            self.launch("kv_store", Launch::linear(nt * kv.width, BLOCK), &store);
            let attend = [
                Arg::Ptr(at(q)),
                Arg::Ptr(kc.ptr),
                Arg::Ptr(vc.ptr),
                Arg::Ptr(at(&out)),
                Arg::U32(nt as u32),
                Arg::U32(p.n_heads as u32),
                Arg::U32((p.n_heads / p.n_kv_heads) as u32),
                Arg::U32(p.head_dim as u32),
                Arg::U32((pos0 + t0) as u32),
                Arg::U32(kv.width as u32),
                Arg::U32(p.window.unwrap_or(0) as u32),
                Arg::F32(p.scale),
                Arg::U32(kv.slots as u32),
            ];
            self.launch("attend", Launch::grid2(p.n_heads, nt, 128), &attend);
        }
        kv.len += n;
        self.take_error()?;
        Ok(out)
    }
}
