//! The wgpu backend: every op of the transformer as a WGSL compute kernel (Vulkan,
//! Metal, DX12). Weights are uploaded in their GGUF storage type and decoded inside the
//! kernels; activations stay in f32 and the KV cache (f16) lives on the device.
//!
//! Ops only record: each appends a compute pass to one command encoder, with its
//! parameters in one shared uniform buffer at a dynamic offset, and the encoder is
//! submitted when the host needs a result (`to_host`) or must write a buffer, so a
//! forward pass is a few command buffers. Pipelines are built once per kernel and
//! storage type; intermediate buffers come from a pool keyed by size, so a steady decode
//! loop binds the same buffers in the same order and its bind groups come from a cache.
//! Device errors (out of memory, a lost device) are collected and reported by
//! [`Backend::status`] after the pass; nothing here panics on them.

mod shaders;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cairn_formats::GgmlType;

use super::{AttnParams, Backend, KvLayer, RopeStyle};
use crate::bitstack::StackWeight;
use crate::error::{Error, Result};
use crate::weights::HostTensor;

/// Dynamic offsets of the uniform buffer step by this (WebGPU's largest required alignment).
const PARAM_STRIDE: u64 = 256;
/// Dispatches per submission before the uniform buffer is flushed.
const PARAM_SLOTS: u64 = 4096;
/// Weight rows × tokens per matmul workgroup (`TR`, `TT` in matmul.wgsl): the matvec
/// variant for one token, the batch variant otherwise.
fn matmul_tile(n: usize) -> (usize, usize) {
    if n == 1 {
        (8, 1)
    } else {
        (4, 8)
    }
}
/// Threads per workgroup (`WG` in common.wgsl).
const WG: usize = 64;
/// Largest head dimension `attend` holds in workgroup memory.
const MAX_HEAD_DIM: usize = 256;
/// Largest BitStack rank `bitstack.wgsl` holds in workgroup memory (`MAX_RANK`).
const MAX_RANK: usize = 64;
/// Tokens per attention dispatch on a sliding-window layer: its cache keeps window +
/// this − 1 positions in a ring, enough for one such group of queries (a multiple of 64,
/// so group offsets stay aligned).
const KV_CHUNK: usize = 256;
/// How long a submission may run before the device counts as hung.
const GPU_TIMEOUT: Duration = Duration::from_secs(600);

/// Adapter selection and limits (tests shrink `max_binding` to exercise splitting).
#[derive(Debug, Clone, Default)]
pub struct WgpuOptions {
    /// Index (as `cairn info --devices` lists them) or a case-insensitive part of the
    /// name; default: the first discrete GPU, else integrated, else any.
    pub adapter: Option<String>,
    /// Cap on the bytes one storage binding may cover (default: the adapter's limit).
    pub max_binding: Option<u64>,
    /// Tokens per attention dispatch on sliding-window layers (a multiple of 64; default
    /// 256; tests shrink it to make the ring wrap).
    pub kv_chunk: Option<usize>,
}

/// One adapter as `cairn info --devices` shows it.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub device_type: String,
    pub backend: String,
    pub driver: String,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub subgroup_sizes: (u32, u32),
    pub max_storage_binding: u64,
    pub max_buffer: u64,
    pub max_workgroup_storage: u32,
    pub max_invocations: u32,
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::PRIMARY;
    wgpu::Instance::new(desc)
}

fn adapters() -> Vec<wgpu::Adapter> {
    pollster::block_on(instance().enumerate_adapters(wgpu::Backends::PRIMARY))
}

/// Every adapter wgpu finds (empty without a driver: no crash).
pub fn list_adapters() -> Vec<AdapterSummary> {
    adapters().iter().enumerate().map(|(i, a)| summary(i, a)).collect()
}

fn summary(index: usize, a: &wgpu::Adapter) -> AdapterSummary {
    let (info, f, l) = (a.get_info(), a.features(), a.limits());
    AdapterSummary {
        index,
        name: info.name.clone(),
        device_type: format!("{:?}", info.device_type),
        backend: format!("{:?}", info.backend),
        driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
        shader_f16: f.contains(wgpu::Features::SHADER_F16),
        subgroups: f.contains(wgpu::Features::SUBGROUP),
        subgroup_sizes: (info.subgroup_min_size, info.subgroup_max_size),
        max_storage_binding: l.max_storage_buffer_binding_size,
        max_buffer: l.max_buffer_size,
        max_workgroup_storage: l.max_compute_workgroup_storage_size,
        max_invocations: l.max_compute_invocations_per_workgroup,
    }
}

/// Whether a real GPU (not a CPU emulation such as llvmpipe) is present: what
/// `--backend auto` asks.
pub fn has_gpu() -> bool {
    adapters()
        .iter()
        .any(|a| matches!(a.get_info().device_type, wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu))
}

fn pick(adapters: Vec<wgpu::Adapter>, want: Option<&str>) -> Result<wgpu::Adapter> {
    if adapters.is_empty() {
        return Err(Error::model(
            "wgpu: no GPU adapter found (no Vulkan/Metal/DX12 driver; on Debian: apt-get install mesa-vulkan-drivers libvulkan1)",
        ));
    }
    let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
    if let Some(w) = want {
        let i = match w.parse::<usize>() {
            Ok(i) if i < adapters.len() => Some(i),
            _ => names.iter().position(|n| n.to_lowercase().contains(&w.to_lowercase())),
        };
        let i = i.ok_or_else(|| Error::input(format!("wgpu: no adapter {w:?} (found: {})", names.join(", "))))?;
        return Ok(adapters.into_iter().nth(i).expect("index checked"));
    }
    let rank = |a: &wgpu::Adapter| match a.get_info().device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    Ok(adapters.into_iter().min_by_key(rank).expect("not empty"))
}

/// Which compute kernel (and, for the weight readers, which storage type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kernel {
    Matmul(GgmlType),
    Matvec(GgmlType),
    Embed(GgmlType),
    RmsNorm,
    Rope,
    Swiglu,
    Geglu,
    Add,
    KvStore,
    Attend,
    /// One BitStack block (batch and decode variants).
    Stack,
    StackVec,
}

impl Kernel {
    /// (source file, entry point, storage bindings as (binding, read-only)).
    fn layout(self) -> (&'static str, &'static str, &'static [(u32, bool)]) {
        const IO3: &[(u32, bool)] = &[(1, true), (2, true), (3, false)];
        match self {
            Kernel::Matmul(_) | Kernel::Matvec(_) => ("matmul", "main", IO3),
            Kernel::Stack | Kernel::StackVec => ("bitstack", "main", IO3),
            Kernel::Embed(_) => ("embed", "main", IO3),
            Kernel::RmsNorm => ("norm", "main", IO3),
            Kernel::Rope => ("rope", "main", &[(1, true), (2, false)]),
            Kernel::Swiglu => ("elementwise", "swiglu", IO3),
            Kernel::Geglu => ("elementwise", "geglu", IO3),
            Kernel::Add => ("elementwise", "add", IO3),
            Kernel::KvStore => ("attention", "store", &[(1, true), (2, true), (3, false), (4, false)]),
            Kernel::Attend => ("attention", "attend", &[(1, true), (3, false), (4, false), (5, false)]),
        }
    }
}

struct Pipe {
    id: u32,
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// A device buffer with a stable id (the bind-group cache's key). Pooled buffers go
/// back to the pool when dropped; others take their cached bind groups with them.
struct Buf {
    id: u64,
    buf: wgpu::Buffer,
    size: u64,
    pooled: bool,
    sh: Arc<Shared>,
}

impl Drop for Buf {
    fn drop(&mut self) {
        if self.pooled {
            lock(&self.sh.pool).entry(self.size).or_default().push((self.id, self.buf.clone()));
        } else {
            let id = self.id;
            lock(&self.sh.st).binds.retain(|k, _| !k.bufs.iter().any(|b| b.0 == id));
        }
    }
}

#[derive(PartialEq, Eq, Hash)]
struct BindKey {
    pipe: u32,
    bufs: Vec<(u64, u64, u64)>,
}

/// (pos0, rows, head_dim, base bits) of a RoPE table.
type RopeKey = (usize, usize, usize, u32);

/// What ops record into until the next submission.
struct State {
    enc: Option<wgpu::CommandEncoder>,
    params: Vec<u8>,
    binds: HashMap<BindKey, wgpu::BindGroup>,
    /// The last RoPE table: (pos0, rows, head_dim, base bits) and its buffer; q and k
    /// of every layer in a pass share it.
    rope: Option<(RopeKey, Arc<Buf>)>,
}

struct Shared {
    device: wgpu::Device,
    queue: wgpu::Queue,
    params_buf: wgpu::Buffer,
    pipes: Mutex<HashMap<Kernel, Arc<Pipe>>>,
    st: Mutex<State>,
    pool: Mutex<HashMap<u64, Vec<(u64, wgpu::Buffer)>>>,
    error: Arc<Mutex<Option<String>>>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these maps half-updated in a way that matters.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Activations: `rows × cols` f32 in a device buffer.
pub struct GpuTensor {
    buf: Buf,
    pub rows: usize,
    pub cols: usize,
}

/// A weight in its storage type (GGUF or FineQuant), split by rows into buffers that
/// each fit one storage binding (and one dispatch dimension); or a BitStack matrix.
pub struct GpuWeight {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    chunks: Vec<(usize, usize, Buf)>,
    stack: Option<GpuStack>,
}

/// A BitStack matrix on the device: its active blocks uploaded as stored (signs, U, V;
/// never a dense weight), one buffer per level. Every matmul first compares them with
/// the matrix's active count, uploading blocks that joined and freeing those that left,
/// so a budget change applies at the next call without a reload.
struct GpuStack {
    src: Arc<StackWeight>,
    levels: Mutex<Vec<Buf>>,
}

/// One layer's cache: f16 keys and values on the device, position `p` in slot
/// `p mod slots`. Allocated at the first attention call, when the layer's window is
/// known: a global layer gets `capacity` slots, a sliding-window layer of window `w`
/// only `w + KV_CHUNK − 1` (a ring: positions no later query can see are overwritten),
/// so its memory stays bounded however long the context, as on the CPU.
pub struct GpuKv {
    bufs: Option<(Buf, Buf)>,
    len: usize,
    capacity: usize,
    width: usize,
    slots: usize,
    window: Option<usize>,
}

impl KvLayer for GpuKv {
    fn keepable(&self, len: usize) -> usize {
        super::ring_keepable(len, self.len, self.slots, self.window)
    }
    fn truncate(&mut self, len: usize) -> usize {
        self.len = self.keepable(len);
        self.len
    }
}

pub struct WgpuBackend {
    sh: Arc<Shared>,
    name: String,
    f16: bool,
    subgroups: bool,
    max_binding: u64,
    max_buffer: u64,
    kv_chunk: usize,
}

impl WgpuBackend {
    /// The adapter `CAIRN_WGPU_ADAPTER` names (index or part of the name), else the
    /// best one, with its own limits.
    pub fn new() -> Result<Self> {
        let adapter = std::env::var("CAIRN_WGPU_ADAPTER").ok().filter(|s| !s.is_empty());
        Self::with_options(&WgpuOptions { adapter, ..Default::default() })
    }

    pub fn with_options(opts: &WgpuOptions) -> Result<Self> {
        let adapter = pick(adapters(), opts.adapter.as_deref())?;
        let info = adapter.get_info();
        let have = adapter.features();
        let f16 = have.contains(wgpu::Features::SHADER_F16);
        // Subgroup reductions assume a subgroup never spans more than one workgroup.
        let subgroups = have.contains(wgpu::Features::SUBGROUP)
            && info.subgroup_max_size as usize <= WG
            && std::env::var_os("CAIRN_WGPU_NO_SUBGROUPS").is_none();
        let f16 = f16 && std::env::var_os("CAIRN_WGPU_NO_F16").is_none();
        let mut features = wgpu::Features::empty();
        if f16 {
            features |= wgpu::Features::SHADER_F16;
        }
        if subgroups {
            features |= wgpu::Features::SUBGROUP;
        }
        let limits = adapter.limits();
        let desc = wgpu::DeviceDescriptor {
            label: Some("cairn"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc))
            .map_err(|e| Error::model(format!("wgpu: cannot open {}: {e}", info.name)))?;
        let error: Arc<Mutex<Option<String>>> = Arc::default();
        let slot = error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut s = lock(&slot);
            if s.is_none() {
                *s = Some(describe(&e));
            }
        }));
        let slot = error.clone();
        device.set_device_lost_callback(move |reason, msg| {
            let mut s = lock(&slot);
            if s.is_none() {
                *s = Some(format!("the GPU device was lost ({reason:?}): {msg}"));
            }
        });
        let params_buf = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: PARAM_STRIDE * PARAM_SLOTS,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let align = u64::from(limits.min_storage_buffer_offset_alignment).max(256);
        let max_binding =
            opts.max_binding.unwrap_or(u64::MAX).min(limits.max_storage_buffer_binding_size) / align * align;
        let sh = Arc::new(Shared {
            device,
            queue,
            params_buf,
            pipes: Mutex::default(),
            st: Mutex::new(State { enc: None, params: Vec::new(), binds: HashMap::new(), rope: None }),
            pool: Mutex::default(),
            error,
            next_id: AtomicU64::new(1),
        });
        let mut flags = vec![];
        if f16 {
            flags.push("shader-f16");
        }
        if subgroups {
            flags.push("subgroups");
        }
        let name = format!(
            "wgpu {} ({:?}{}{})",
            info.name,
            info.backend,
            if flags.is_empty() { "" } else { ", " },
            flags.join(", ")
        );
        let kv_chunk = opts.kv_chunk.unwrap_or(KV_CHUNK).next_multiple_of(64);
        let be = WgpuBackend { sh, name, f16, subgroups, max_binding, max_buffer: limits.max_buffer_size, kv_chunk };
        for k in
            [Kernel::RmsNorm, Kernel::Rope, Kernel::Swiglu, Kernel::Geglu, Kernel::Add, Kernel::KvStore, Kernel::Attend]
        {
            be.pipe(k)?;
        }
        Ok(be)
    }

    /// Whether kernels use native f16 (the adapter offers shader-f16).
    pub fn uses_f16(&self) -> bool {
        self.f16
    }

    /// Whether reductions use subgroup operations.
    pub fn uses_subgroups(&self) -> bool {
        self.subgroups
    }

    /// The pipeline of `k`, built on first use.
    fn pipe(&self, k: Kernel) -> Result<Arc<Pipe>> {
        if let Some(p) = lock(&self.sh.pipes).get(&k) {
            return Ok(p.clone());
        }
        let (file, entry, bindings) = k.layout();
        let quant = match k {
            Kernel::Matmul(ty) | Kernel::Matvec(ty) | Kernel::Embed(ty) => {
                Some(shaders::quant_snippet(ty).ok_or_else(|| {
                    Error::model(format!("wgpu: no kernel for {ty:?} weights yet (use --backend cpu)"))
                })?)
            }
            _ => None,
        };
        let mut defs = vec![];
        if self.f16 {
            defs.push("F16");
        }
        if self.subgroups {
            defs.push("SUBGROUP");
        }
        if matches!(k, Kernel::Matvec(_) | Kernel::StackVec) {
            defs.push("MATVEC");
        }
        // FineQuant's width, symmetry and group size: override constants of fine.wgsl.
        let constants: Vec<(&str, f64)> = match k {
            Kernel::Matmul(GgmlType::Fine(ft))
            | Kernel::Matvec(GgmlType::Fine(ft))
            | Kernel::Embed(GgmlType::Fine(ft)) => {
                vec![
                    ("FQ_BITS", f64::from(ft.bits())),
                    ("FQ_SYM", if ft.sym() { 1.0 } else { 0.0 }),
                    ("FQ_GROUP", ft.group() as f64),
                ]
            }
            _ => vec![],
        };
        let src = shaders::assemble(file, quant, &defs).map_err(Error::model)?;
        let dev = &self.sh.device;
        let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(file),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        });
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: true,
                min_binding_size: None,
            },
            count: None,
        }];
        for &(binding, read_only) in bindings {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        let layout = dev.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: None, entries: &entries });
        let pl = dev.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: None,
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: Some(&pl),
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions { constants: &constants, ..Default::default() },
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::model(format!(
                "wgpu: kernel {file}/{entry} for {k:?} failed to build: {}",
                describe(&e)
            )));
        }
        let mut pipes = lock(&self.sh.pipes);
        let id = pipes.len() as u32;
        let p = Arc::new(Pipe { id, pipeline, layout });
        pipes.insert(k, p.clone());
        Ok(p)
    }

    fn note_error(&self, msg: String) {
        let mut s = lock(&self.sh.error);
        if s.is_none() {
            *s = Some(msg);
        }
    }

    fn new_buffer(&self, size: u64, usage: wgpu::BufferUsages, pooled: bool) -> Buf {
        let id = self.sh.next_id.fetch_add(1, Ordering::Relaxed);
        let buf = self.sh.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage,
            mapped_at_creation: false,
        });
        Buf { id, buf, size, pooled, sh: self.sh.clone() }
    }

    /// A device buffer of at least `bytes` from the pool (sizes rounded up to a power of
    /// two, so that varying batch sizes reuse buffers). A size the adapter cannot hold is
    /// reported through [`Backend::status`], with a stand-in so recording can go on.
    fn alloc(&self, bytes: usize) -> Buf {
        let size = (bytes.max(16) as u64).next_power_of_two();
        if size > self.max_buffer {
            self.note_error(format!(
                "wgpu: an activation of {} MiB exceeds the adapter's largest buffer ({} MiB); use fewer tokens per batch",
                bytes >> 20,
                self.max_buffer >> 20
            ));
            return self.alloc(16);
        }
        if let Some((id, buf)) = lock(&self.sh.pool).get_mut(&size).and_then(|v| v.pop()) {
            return Buf { id, buf, size, pooled: true, sh: self.sh.clone() };
        }
        use wgpu::BufferUsages as U;
        self.new_buffer(size, U::STORAGE | U::COPY_SRC | U::COPY_DST, true)
    }

    fn tensor(&self, rows: usize, cols: usize) -> GpuTensor {
        GpuTensor { buf: self.alloc(rows * cols * 4), rows, cols }
    }

    /// Write `data` into `buf` after everything recorded so far (queue writes land before
    /// the next submission, so pending work is submitted first).
    fn write(&self, buf: &Buf, data: &[u8]) {
        let mut st = lock(&self.sh.st);
        self.flush(&mut st);
        self.sh.queue.write_buffer(&buf.buf, 0, data);
    }

    /// Submit what is recorded (with its parameters).
    fn flush(&self, st: &mut State) -> Option<wgpu::SubmissionIndex> {
        let enc = st.enc.take()?;
        self.sh.queue.write_buffer(&self.sh.params_buf, 0, &st.params);
        st.params.clear();
        Some(self.sh.queue.submit([enc.finish()]))
    }

    fn record<'a>(&self, st: &'a mut State) -> &'a mut wgpu::CommandEncoder {
        st.enc.get_or_insert_with(|| self.sh.device.create_command_encoder(&Default::default()))
    }

    /// Record one dispatch of `k` over `groups` workgroups with `params` and the storage
    /// buffers `bufs` as (buffer, byte offset, byte size) in binding order.
    fn dispatch(&self, k: Kernel, params: &[u32], bufs: &[(&Buf, u64, u64)], groups: (u32, u32)) {
        if groups.0 == 0 || groups.1 == 0 {
            return;
        }
        let pipe = match self.pipe(k) {
            Ok(p) => p,
            Err(e) => return self.note_error(e.to_string()),
        };
        let mut st = lock(&self.sh.st);
        if st.params.len() as u64 >= PARAM_STRIDE * PARAM_SLOTS {
            self.flush(&mut st);
        }
        let offset = st.params.len() as u32;
        st.params.extend(params.iter().flat_map(|v| v.to_le_bytes()));
        st.params.resize(offset as usize + PARAM_STRIDE as usize, 0);
        let key = BindKey { pipe: pipe.id, bufs: bufs.iter().map(|(b, o, s)| (b.id, *o, *s)).collect() };
        if !st.binds.contains_key(&key) {
            if st.binds.len() > 16384 {
                st.binds.clear();
            }
            let (_, _, bindings) = k.layout();
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &self.sh.params_buf,
                    offset: 0,
                    size: std::num::NonZeroU64::new(PARAM_STRIDE),
                }),
            }];
            for (&(binding, _), (b, o, s)) in bindings.iter().zip(bufs) {
                entries.push(wgpu::BindGroupEntry {
                    binding,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &b.buf,
                        offset: *o,
                        size: std::num::NonZeroU64::new(*s),
                    }),
                });
            }
            let bg = self.sh.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipe.layout,
                entries: &entries,
            });
            st.binds.insert(BindKey { pipe: key.pipe, bufs: key.bufs.clone() }, bg);
        }
        let bg = st.binds[&key].clone();
        let enc = self.record(&mut st);
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
        pass.set_pipeline(&pipe.pipeline);
        pass.set_bind_group(0, &bg, &[offset]);
        pass.dispatch_workgroups(groups.0, groups.1, 1);
    }

    /// Workgroups for `threads` invocations of a 1-D kernel, spread over x and y.
    fn grid(threads: usize) -> (u32, u32) {
        let groups = threads.div_ceil(WG).max(1);
        let x = groups.min(65535);
        (x as u32, groups.div_ceil(x) as u32)
    }

    fn whole(t: &GpuTensor) -> (&Buf, u64, u64) {
        (&t.buf, 0, (t.rows * t.cols * 4).max(4) as u64)
    }

    fn check_binding(&self, what: &str, bytes: usize) -> bool {
        if bytes as u64 > self.max_binding {
            self.note_error(format!(
                "wgpu: {what} of {} MiB exceeds the adapter's largest storage binding ({} MiB); use fewer tokens per batch",
                bytes >> 20,
                self.max_binding >> 20
            ));
            return false;
        }
        true
    }

    fn elementwise(&self, k: Kernel, a: &GpuTensor, b: &GpuTensor) -> GpuTensor {
        let out = self.tensor(a.rows, a.cols);
        let len = a.rows * a.cols;
        if a.rows * a.cols != b.rows * b.cols {
            self.note_error(format!("wgpu: {k:?} of {}x{} and {}x{}", a.rows, a.cols, b.rows, b.cols));
            return out;
        }
        if self.check_binding("an activation", len * 4) {
            self.dispatch(
                k,
                &[len as u32, 0, 0, 0],
                &[Self::whole(a), Self::whole(b), Self::whole(&out)],
                Self::grid(len),
            );
        }
        out
    }

    /// The first attention call of a layer allocates its cache: the whole capacity, or
    /// for a sliding-window layer a ring of window + `KV_CHUNK` − 1 slots.
    fn kv_alloc(&self, kv: &mut GpuKv, window: Option<usize>) -> Result<()> {
        if kv.bufs.is_some() {
            if kv.slots < kv.capacity && window != kv.window {
                return Err(Error::model("wgpu: a sliding-window cache used with another window"));
            }
            return Ok(());
        }
        kv.window = window;
        kv.slots = match window {
            Some(w) if w > 0 && w + self.kv_chunk - 1 < kv.capacity => w + self.kv_chunk - 1,
            _ => kv.capacity.max(1),
        };
        let bytes = kv.slots * kv.width * 2;
        use wgpu::BufferUsages as U;
        let scope = self.sh.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let size = (bytes.div_ceil(4) * 4).max(4) as u64;
        let k = self.new_buffer(size, U::STORAGE | U::COPY_DST, false);
        let v = self.new_buffer(size, U::STORAGE | U::COPY_DST, false);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::model(format!("wgpu: no device memory for the KV cache: {}", describe(&e))));
        }
        kv.bufs = Some((k, v));
        Ok(())
    }

    /// Token groups `(t0, tokens)` of an `[n, k] → [n, m]` product whose input and output
    /// slices each fit one binding (offsets stay aligned: groups are multiples of 64 rows
    /// of 4-byte values). A group too wide even so is reported and ends the list.
    fn token_groups(&self, n: usize, k: usize, m: usize) -> Vec<(usize, usize)> {
        let widest = (k.max(m) * 4) as u64;
        let step = if (n as u64) * widest <= self.max_binding {
            n
        } else {
            ((self.max_binding / widest) as usize / 64 * 64).max(64)
        };
        let mut groups = Vec::new();
        for t0 in (0..n).step_by(step.max(1)) {
            let nt = step.min(n - t0);
            if !self.check_binding("a matmul operand", nt * k.max(m) * 4) {
                break;
            }
            groups.push((t0, nt));
        }
        groups
    }

    /// The device copies of a BitStack matrix's active blocks, brought in line with its
    /// active count now: blocks that joined are uploaded (and their mapped pages
    /// released), blocks that left are freed.
    fn sync_stack<'a>(&self, s: &'a GpuStack) -> Result<MutexGuard<'a, Vec<Buf>>> {
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

    /// `x Wᵀ` for a BitStack matrix: one dispatch per active block, each rebuilding its
    /// weights in registers; the first writes `out`, the others add to it.
    fn stack_matmul(&self, x: &GpuTensor, s: &GpuStack, out: &GpuTensor) {
        let levels = match self.sync_stack(s) {
            Ok(l) => l,
            Err(e) => return self.note_error(e.to_string()),
        };
        let sh = s.src.shape;
        let (n, k, m) = (x.rows, sh.n, sh.m);
        if levels.is_empty() {
            // No block in use: the matrix is zero.
            let mut st = lock(&self.sh.st);
            self.record(&mut st).clear_buffer(&out.buf.buf, 0, None);
            return;
        }
        for (t0, nt) in self.token_groups(n, k, m) {
            let xs = (&x.buf, (t0 * k * 4) as u64, (nt * k * 4) as u64);
            let ys = (&out.buf, (t0 * m * 4) as u64, (nt * m * 4) as u64);
            let (tr, tt) = matmul_tile(nt);
            let kernel = if nt == 1 { Kernel::StackVec } else { Kernel::Stack };
            let groups = (m.div_ceil(tr) as u32, nt.div_ceil(tt) as u32);
            for (l, buf) in levels.iter().enumerate() {
                let p = [
                    nt as u32,
                    k as u32,
                    m as u32,
                    m as u32,
                    sh.k as u32,
                    sh.u_offset() as u32,
                    sh.v_offset() as u32,
                    sh.sign_row_bytes() as u32,
                    u32::from(l > 0),
                    0,
                    0,
                    0,
                ];
                self.dispatch(kernel, &p, &[(buf, 0, buf.size), xs, ys], groups);
            }
        }
    }

    /// The (cos, sin) table of RoPE for `n` rows from `pos0`, angles in f64 as the CPU.
    fn rope_table(&self, pos0: usize, n: usize, hd: usize, base: f32) -> Arc<Buf> {
        let key = (pos0, n, hd, base.to_bits());
        if let Some((k, b)) = &lock(&self.sh.st).rope {
            if *k == key {
                return b.clone();
            }
        }
        let t = super::rope_table(pos0, n, hd, base);
        use wgpu::BufferUsages as U;
        let buf = Arc::new(self.new_buffer((t.len() * 4).max(16) as u64, U::STORAGE | U::COPY_DST, false));
        self.write(&buf, bytemuck::cast_slice(&t));
        // The old table is dropped after the lock is released (its drop takes the lock).
        let old = lock(&self.sh.st).rope.replace((key, buf.clone()));
        drop(old);
        buf
    }

    /// Upload `bytes` as a weight buffer, reporting an out-of-memory as an error.
    fn upload_weight(&self, name: &str, bytes: &[u8]) -> Result<Buf> {
        use wgpu::BufferUsages as U;
        let size = (bytes.len().div_ceil(4) * 4).max(4) as u64;
        if size > self.max_buffer {
            return Err(Error::model(format!(
                "wgpu: {name} ({} MiB) exceeds the adapter's largest buffer",
                size >> 20
            )));
        }
        let scope = self.sh.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = self.new_buffer(size, U::STORAGE | U::COPY_DST, false);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::model(format!("wgpu: no device memory for {name}: {}", describe(&e))));
        }
        if bytes.len().is_multiple_of(4) {
            self.write(&buf, bytes);
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(size as usize, 0);
            self.write(&buf, &padded);
        }
        Ok(buf)
    }

    /// Submit pending work and wait for it (bounded: a hung device is an error).
    fn wait(&self, idx: Option<wgpu::SubmissionIndex>) -> Result<()> {
        let poll = wgpu::PollType::Wait { submission_index: idx, timeout: Some(GPU_TIMEOUT) };
        self.sh
            .device
            .poll(poll)
            .map(|_| ())
            .map_err(|e| Error::model(format!("wgpu: waiting for the GPU failed: {e}")))
    }

    fn take_error(&self) -> Result<()> {
        match lock(&self.sh.error).take() {
            Some(e) => Err(Error::model(e)),
            None => Ok(()),
        }
    }

    fn read_back(&self, x: &GpuTensor) -> Result<Vec<f32>> {
        let bytes = (x.rows * x.cols * 4) as u64;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        use wgpu::BufferUsages as U;
        let staging = self.new_buffer(bytes, U::MAP_READ | U::COPY_DST, false);
        let idx = {
            let mut st = lock(&self.sh.st);
            self.record(&mut st).copy_buffer_to_buffer(&x.buf.buf, 0, &staging.buf, 0, bytes);
            self.flush(&mut st)
        };
        let done: Arc<Mutex<Option<bool>>> = Arc::default();
        let slot = done.clone();
        staging.buf.map_async(wgpu::MapMode::Read, .., move |r| *lock(&slot) = Some(r.is_ok()));
        self.wait(idx)?;
        // Another thread polling the shared device may be running the map callback just
        // now: poll again until it has reported (seen as a flaky readback failure).
        for _ in 0..100 {
            if lock(&done).is_some() {
                break;
            }
            self.wait(None)?;
            std::thread::yield_now();
        }
        self.take_error()?;
        if *lock(&done) != Some(true) {
            return Err(Error::model("wgpu: reading a result back from the GPU failed"));
        }
        let out = {
            let view = staging
                .buf
                .get_mapped_range(..)
                .map_err(|e| Error::model(format!("wgpu: reading a result back from the GPU failed: {e}")))?;
            bytemuck::pod_collect_to_vec::<u8, f32>(&view)
        };
        staging.buf.unmap();
        Ok(out)
    }
}

impl Drop for WgpuBackend {
    fn drop(&mut self) {
        // The cached RoPE table holds the shared state; release it so the device goes.
        let old = lock(&self.sh.st).rope.take();
        drop(old);
    }
}

fn describe(e: &wgpu::Error) -> String {
    match e {
        wgpu::Error::OutOfMemory { .. } => "wgpu: the GPU is out of memory".to_string(),
        other => format!("wgpu: {other}"),
    }
}

impl Backend for WgpuBackend {
    type Tensor = GpuTensor;
    type Weight = GpuWeight;
    type Kv = GpuKv;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn load_weight(&self, t: &HostTensor) -> Result<GpuWeight> {
        if t.dims.len() == 1 {
            // Norm weights: tiny, kept as f32 as on the CPU.
            let v = t.to_f32()?;
            let buf = self.upload_weight(&t.name, bytemuck::cast_slice(&v))?;
            return Ok(GpuWeight {
                ty: GgmlType::F32,
                rows: 1,
                cols: v.len(),
                row_bytes: v.len() * 4,
                chunks: vec![(0, 1, buf)],
                stack: None,
            });
        }
        let (rows, cols, rb) = (t.rows(), t.cols(), t.row_bytes());
        let ty = t.ty;
        if cols % 4 != 0 {
            return Err(Error::model(format!("wgpu: {}: rows of {cols} values are not a multiple of 4", t.name)));
        }
        self.pipe(Kernel::Matmul(ty)).map_err(|e| Error::model(format!("{}: {e}", t.name)))?;
        self.pipe(Kernel::Matvec(ty))?;
        self.pipe(Kernel::Embed(ty))?;
        let per = ((self.max_binding / rb.max(1) as u64) as usize).min(65535);
        if per == 0 {
            return Err(Error::model(format!("wgpu: {}: one row exceeds the adapter's storage binding", t.name)));
        }
        let bytes = t.bytes();
        let mut chunks = Vec::new();
        for r0 in (0..rows).step_by(per) {
            let n = per.min(rows - r0);
            chunks.push((r0, n, self.upload_weight(&t.name, &bytes[r0 * rb..(r0 + n) * rb])?));
        }
        // The device copy replaces the mapping's pages.
        t.release_pages();
        self.take_error()?;
        Ok(GpuWeight { ty, rows, cols, row_bytes: rb, chunks, stack: None })
    }

    fn load_stack(&self, w: &Arc<StackWeight>) -> Result<GpuWeight> {
        // Dense copies stay the CPU's, as before backends supplied the builder: a budget
        // counts them, while these kernels run a copied matrix's levels from its blocks.
        w.set_dense_builder(super::cpu::bitstack::dense_copy);
        let s = w.shape;
        let refuse = |why: String| Err(Error::model(format!("wgpu: BitStack matrix {}: {why}", w.name)));
        if s.k > MAX_RANK {
            return refuse(format!("rank {} exceeds the kernel's {MAX_RANK} (use --backend cpu)", s.k));
        }
        if !s.n.is_multiple_of(4) {
            return refuse(format!("rows of {} values are not a multiple of 4", s.n));
        }
        if s.bytes() as u64 > self.max_binding {
            return refuse(format!(
                "a block of {} MiB exceeds the adapter's storage binding ({} MiB)",
                s.bytes() >> 20,
                self.max_binding >> 20
            ));
        }
        if s.m.div_ceil(matmul_tile(1).0) > 65535 {
            return refuse(format!("{} rows exceed one dispatch", s.m));
        }
        self.pipe(Kernel::Stack)?;
        self.pipe(Kernel::StackVec)?;
        let stack = GpuStack { src: w.clone(), levels: Mutex::default() };
        // The blocks active now go up at load, so a device out of memory shows here.
        drop(self.sync_stack(&stack)?);
        self.take_error()?;
        Ok(GpuWeight {
            ty: cairn_formats::bitstack::BLOCK_TYPE,
            rows: s.m,
            cols: s.n,
            row_bytes: 0,
            chunks: Vec::new(),
            stack: Some(stack),
        })
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> GpuTensor {
        assert_eq!(data.len(), rows * cols, "upload: shape does not match data");
        let t = self.tensor(rows, cols);
        if !data.is_empty() {
            self.write(&t.buf, bytemuck::cast_slice(data));
        }
        t
    }

    fn to_host(&self, x: GpuTensor) -> Vec<f32> {
        match self.read_back(&x) {
            Ok(v) => v,
            Err(e) => {
                // Reported by `status`; the caller gets values of the right shape.
                self.note_error(e.to_string());
                vec![f32::NAN; x.rows * x.cols]
            }
        }
    }

    fn rows(&self, x: &GpuTensor, start: usize, n: usize) -> GpuTensor {
        let out = self.tensor(n, x.cols);
        let bytes = (n * x.cols * 4) as u64;
        if bytes > 0 {
            let mut st = lock(&self.sh.st);
            let enc = self.record(&mut st);
            enc.copy_buffer_to_buffer(&x.buf.buf, (start * x.cols * 4) as u64, &out.buf.buf, 0, bytes);
        }
        out
    }

    fn concat(&self, parts: &[GpuTensor]) -> GpuTensor {
        let cols = parts.first().map_or(0, |p| p.cols);
        assert!(parts.iter().all(|p| p.cols == cols), "concat: parts of different widths");
        let out = self.tensor(parts.iter().map(|p| p.rows).sum(), cols);
        let mut st = lock(&self.sh.st);
        let enc = self.record(&mut st);
        let mut at = 0u64;
        for p in parts {
            let bytes = (p.rows * cols * 4) as u64;
            if bytes > 0 {
                enc.copy_buffer_to_buffer(&p.buf.buf, 0, &out.buf.buf, at, bytes);
            }
            at += bytes;
        }
        out
    }

    fn embed(&self, table: &GpuWeight, ids: &[u32], scale: f32) -> Result<GpuTensor> {
        if table.stack.is_some() {
            return Err(Error::model("wgpu: an embedding table cannot be a BitStack matrix"));
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= table.rows) {
            return Err(Error::input(format!("token id {id} is outside the vocabulary of {}", table.rows)));
        }
        let dim = table.cols;
        let out = self.tensor(ids.len(), dim);
        let idbuf = self.alloc(ids.len() * 4);
        self.write(&idbuf, bytemuck::cast_slice(ids));
        self.check_binding("an embedding batch", ids.len() * dim * 4);
        for (r0, n, buf) in &table.chunks {
            let p =
                [ids.len() as u32, dim as u32, *r0 as u32, *n as u32, table.row_bytes as u32, scale.to_bits(), 0, 0];
            let bufs = [(buf, 0, buf.size), (&idbuf, 0, (ids.len() * 4) as u64), Self::whole(&out)];
            self.dispatch(Kernel::Embed(table.ty), &p, &bufs, Self::grid(ids.len() * dim / 4));
        }
        self.take_error()?;
        Ok(out)
    }

    fn matmul(&self, x: &GpuTensor, w: &GpuWeight) -> GpuTensor {
        let (n, k, m) = (x.rows, x.cols, w.rows);
        let out = self.tensor(n, m);
        if k != w.cols {
            self.note_error(format!("wgpu: matmul of {n}x{k} by a weight of {m}x{}", w.cols));
            return out;
        }
        if let Some(s) = &w.stack {
            self.stack_matmul(x, s, &out);
            return out;
        }
        for (t0, nt) in self.token_groups(n, k, m) {
            let xs = (&x.buf, (t0 * k * 4) as u64, (nt * k * 4) as u64);
            let ys = (&out.buf, (t0 * m * 4) as u64, (nt * m * 4) as u64);
            let (tr, tt) = matmul_tile(nt);
            for (r0, rows, buf) in &w.chunks {
                let p = [nt as u32, k as u32, *rows as u32, m as u32, *r0 as u32, w.row_bytes as u32, 0, 0];
                let groups = (rows.div_ceil(tr) as u32, nt.div_ceil(tt) as u32);
                let kernel = if nt == 1 { Kernel::Matvec(w.ty) } else { Kernel::Matmul(w.ty) };
                self.dispatch(kernel, &p, &[(buf, 0, buf.size), xs, ys], groups);
            }
        }
        out
    }

    fn rms_norm(&self, x: &GpuTensor, w: &GpuWeight, eps: f32) -> GpuTensor {
        let out = self.tensor(x.rows, x.cols);
        let wlen = w.cols;
        if wlen == 0 || !x.cols.is_multiple_of(wlen) {
            self.note_error(format!("wgpu: RMSNorm of width {} by a weight of {wlen}", x.cols));
            return out;
        }
        let slices = x.rows * x.cols / wlen;
        let p = [slices as u32, wlen as u32, eps.to_bits(), 0];
        let wb = &w.chunks[0].2;
        let groups = Self::grid(slices * WG);
        self.dispatch(Kernel::RmsNorm, &p, &[Self::whole(x), (wb, 0, wb.size), Self::whole(&out)], groups);
        out
    }

    fn rope(&self, x: &mut GpuTensor, head_dim: usize, pos0: usize, base: f32, style: RopeStyle) {
        if head_dim == 0 || !head_dim.is_multiple_of(2) || !x.cols.is_multiple_of(head_dim) {
            return self.note_error(format!("wgpu: RoPE of width {} with heads of {head_dim}", x.cols));
        }
        let table = self.rope_table(pos0, x.rows, head_dim, base);
        let halves = u32::from(style == RopeStyle::Halves);
        let p = [x.rows as u32, x.cols as u32, head_dim as u32, halves];
        let groups = Self::grid(x.rows * x.cols / 2);
        self.dispatch(Kernel::Rope, &p, &[(&table, 0, table.size), Self::whole(x)], groups);
    }

    fn swiglu(&self, gate: &GpuTensor, up: &GpuTensor) -> GpuTensor {
        self.elementwise(Kernel::Swiglu, gate, up)
    }

    fn geglu(&self, gate: &GpuTensor, up: &GpuTensor) -> GpuTensor {
        self.elementwise(Kernel::Geglu, gate, up)
    }

    fn add_assign(&self, x: &mut GpuTensor, y: &GpuTensor) {
        // A buffer cannot be read and written by one dispatch: the sum goes to a new one.
        *x = self.elementwise(Kernel::Add, x, y);
    }

    fn kv_new(&self, n_kv_heads: usize, head_dim: usize, capacity: usize) -> Result<GpuKv> {
        if head_dim > MAX_HEAD_DIM || !head_dim.is_multiple_of(2) {
            return Err(Error::model(format!(
                "wgpu: attention supports even head sizes up to {MAX_HEAD_DIM}, not {head_dim}"
            )));
        }
        let width = n_kv_heads * head_dim;
        // Global layers hold the whole context, so the limit is checked here, once.
        let bytes = capacity.max(1) * width * 2;
        if bytes as u64 > self.max_binding {
            return Err(Error::input(format!(
                "wgpu: a KV cache of {capacity} positions ({} MiB per layer) exceeds the adapter's storage binding ({} MiB); use a smaller --ctx-size",
                bytes >> 20,
                self.max_binding >> 20
            )));
        }
        Ok(GpuKv { bufs: None, len: 0, capacity, width, slots: capacity.max(1), window: None })
    }

    fn attention(
        &self,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        kv: &mut GpuKv,
        pos0: usize,
        p: AttnParams,
    ) -> Result<GpuTensor> {
        super::check_append(pos0, q.rows, kv.len, kv.capacity)?;
        if p.n_kv_heads * p.head_dim != kv.width || k.cols != kv.width || !p.n_heads.is_multiple_of(p.n_kv_heads.max(1))
        {
            return Err(Error::model("wgpu: attention shapes do not match the cache"));
        }
        let n = q.rows;
        if n > 65535 {
            return Err(Error::input("wgpu: at most 65535 tokens per batch"));
        }
        self.kv_alloc(kv, p.window)?;
        let Some((kc, vc)) = &kv.bufs else { return Err(Error::model("wgpu: KV cache not allocated")) };
        // A ring holds the window plus one group of queries: larger batches go a group at
        // a time (each query still sees exactly its window).
        let group = if kv.slots < kv.capacity { kv.slots + 1 - p.window.unwrap_or(1) } else { n.max(1) };
        let qw = p.n_heads * p.head_dim;
        let out = self.tensor(n, qw);
        fn rows(t: &GpuTensor, t0: usize, nt: usize) -> (&Buf, u64, u64) {
            (&t.buf, (t0 * t.cols * 4) as u64, (nt * t.cols * 4).max(4) as u64)
        }
        for t0 in (0..n).step_by(group) {
            let nt = group.min(n - t0);
            let params = [
                nt as u32,
                p.n_heads as u32,
                (p.n_heads / p.n_kv_heads) as u32,
                p.head_dim as u32,
                (pos0 + t0) as u32,
                kv.width as u32,
                p.window.unwrap_or(0) as u32,
                p.scale.to_bits(),
                kv.slots as u32,
                0,
                0,
                0,
            ];
            let (kb, vb) = ((kc, 0, kc.size), (vc, 0, vc.size));
            self.dispatch(
                Kernel::KvStore,
                &params,
                &[rows(k, t0, nt), rows(v, t0, nt), kb, vb],
                Self::grid(nt * kv.width / 2),
            );
            self.dispatch(
                Kernel::Attend,
                &params,
                &[rows(q, t0, nt), kb, vb, rows(&out, t0, nt)],
                (p.n_heads as u32, nt as u32),
            );
        }
        kv.len += n;
        self.take_error()?;
        Ok(out)
    }

    fn status(&self) -> Result<()> {
        self.take_error()
    }
}
