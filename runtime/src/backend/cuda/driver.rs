//! The CUDA driver through cudarc's dynamically loaded bindings: the build needs no
//! toolkit, and a machine without `libcuda` gets an error, never a panic (cudarc panics
//! when a library it needs is missing, so presence is checked first). Kernels are
//! compiled by NVRTC for the device's own architecture and cached on disk as PTX.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use cudarc::driver::{result as cu, sys};
use cudarc::nvrtc::{result as rtc, sys as rtc_sys};

use super::device::{Arg, DevPtr, Device, Launch};
use super::source;
use crate::error::{Error, Result};

fn err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::model(format!("cuda: {what}: {e:?}"))
}

/// `CAIRN_NVRTC` names a libnvrtc to use (one from NVIDIA's Python wheel, say). Loaded
/// once, globally: cudarc's later `dlopen("libnvrtc.so.12")` then finds it by soname.
fn preload_nvrtc() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if let Some(path) = std::env::var_os("CAIRN_NVRTC") {
            if let Ok(c) = CString::new(path.to_string_lossy().as_bytes()) {
                // SAFETY: a NUL-terminated path; the handle is kept for the process's life.
                let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
                if h.is_null() {
                    log::warn!("CAIRN_NVRTC={}: could not be loaded", path.to_string_lossy());
                }
            }
        }
    });
}

/// Whether NVRTC can be loaded, with the reason when it cannot.
pub fn nvrtc_present() -> Result<()> {
    preload_nvrtc();
    // SAFETY: only tries to dlopen the library names cudarc knows.
    if unsafe { rtc_sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::model(
            "cuda: NVRTC (libnvrtc.so.12) not found: install the CUDA toolkit's NVRTC, or set CAIRN_NVRTC to its path",
        ))
    }
}

/// Whether the driver library can be loaded, with the reason when it cannot.
pub fn driver_present() -> Result<()> {
    // SAFETY: only tries to dlopen the library names cudarc knows.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::model("cuda: no NVIDIA driver (libcuda.so not found)"))
    }
}

/// The options every kernel program is compiled with, for `arch` (e.g. "sm_87").
pub fn compile_options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--std=c++17".into(), "-DCAIRN_NVRTC=1".into()]
}

/// PTX of one `.cu` program of `shaders/cuda/` for `arch`, by NVRTC (no driver needed).
pub fn compile(program: &str, arch: &str) -> Result<String> {
    nvrtc_present()?;
    let src = source::assemble(program)?;
    let csrc = CString::new(src).map_err(|_| Error::model(format!("cuda: {program} contains a NUL byte")))?;
    let name = CString::new(program).map_err(|_| Error::model("cuda: bad program name"))?;
    let prog = rtc::create_program(&csrc, Some(&name)).map_err(|e| err("nvrtcCreateProgram", e))?;
    let opts = compile_options(arch);
    // SAFETY: `prog` is the live program created above; destroyed once below.
    let compiled = unsafe { rtc::compile_program(prog, &opts) };
    // SAFETY: as above.
    let log = unsafe { rtc::get_program_log(prog) }
        .map(|l| {
            let bytes: Vec<u8> = l.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .unwrap_or_default();
    // SAFETY: as above.
    let ptx = compiled.and_then(|_| unsafe { rtc::get_ptx(prog) });
    // SAFETY: as above; not used after this.
    let _ = unsafe { rtc::destroy_program(prog) };
    let ptx = ptx.map_err(|e| Error::model(format!("cuda: NVRTC failed on {program} for {arch}: {e:?}\n{log}")))?;
    let bytes: Vec<u8> = ptx.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8(bytes).map_err(|_| Error::model(format!("cuda: NVRTC gave {program} non-UTF-8 PTX")))
}

/// The NVRTC version, part of the cache key (PTX of a newer NVRTC may not load).
fn nvrtc_version() -> (i32, i32) {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (callers checked `nvrtc_present`); two out-parameters.
    let _ = unsafe { rtc_sys::nvrtcVersion(&mut major, &mut minor) };
    (major, minor)
}

/// FNV-1a: a stable cache key across builds (std's hasher is not).
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for p in parts {
        for &b in *p {
            h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x100000001b3);
    }
    h
}

/// [`compile`], through the disk cache `$CAIRN_HOME/cuda/`.
fn compile_cached(program: &str, arch: &str) -> Result<String> {
    nvrtc_present()?;
    let src = source::assemble(program)?;
    let (maj, min) = nvrtc_version();
    let ver = format!("{maj}.{min}");
    let key = fnv(&[src.as_bytes(), arch.as_bytes(), ver.as_bytes()]);
    let dir: PathBuf = crate::weights::cairn_home().join("cuda");
    let path = dir.join(format!("{}-{arch}-{key:016x}.ptx", program.trim_end_matches(".cu")));
    if let Ok(ptx) = std::fs::read_to_string(&path) {
        return Ok(ptx);
    }
    let ptx = compile(program, arch)?;
    // A cache that cannot be written only costs a recompile next time.
    if std::fs::create_dir_all(&dir).is_ok() {
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(ptx)
}

/// What `cairn info --devices` shows of one device.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute: (i32, i32),
    pub memory: usize,
    pub integrated: bool,
    /// Read-only host memory (the mapped model) can be registered and used in place.
    pub host_register: bool,
}

fn attr(dev: sys::CUdevice, a: sys::CUdevice_attribute) -> i32 {
    // SAFETY: `dev` came from cuDeviceGet.
    unsafe { cu::device::get_attribute(dev, a) }.unwrap_or(0)
}

fn info(ordinal: usize, dev: sys::CUdevice) -> Result<DeviceInfo> {
    use sys::CUdevice_attribute as A;
    let name = cu::device::get_name(dev).map_err(|e| err("cuDeviceGetName", e))?;
    // SAFETY: `dev` came from cuDeviceGet.
    let memory = unsafe { cu::device::total_mem(dev) }.map_err(|e| err("cuDeviceTotalMem", e))?;
    Ok(DeviceInfo {
        ordinal,
        name,
        compute: (
            attr(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            attr(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        ),
        memory,
        integrated: attr(dev, A::CU_DEVICE_ATTRIBUTE_INTEGRATED) != 0,
        host_register: attr(dev, A::CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED) != 0
            && attr(dev, A::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED) != 0,
    })
}

/// The CUDA devices present, or why there are none.
pub fn devices() -> Result<Vec<DeviceInfo>> {
    driver_present()?;
    cu::init().map_err(|e| err("cuInit", e))?;
    let n = cu::device::get_count().map_err(|e| err("cuDeviceGetCount", e))?;
    if n <= 0 {
        return Err(Error::model("cuda: the driver reports no device"));
    }
    (0..n as usize)
        .map(|i| {
            let dev = cu::device::get(i as i32).map_err(|e| err("cuDeviceGet", e))?;
            info(i, dev)
        })
        .collect()
}

/// Driver handles, used from whichever thread calls with the context made current.
struct Handles {
    modules: Vec<sys::CUmodule>,
    funcs: HashMap<String, sys::CUfunction>,
    /// Page ranges `[start, end)` of host memory registered with the device (tensors
    /// share pages at their edges, and a page can be registered once).
    registered: Vec<(usize, usize)>,
}

pub struct CudaDevice {
    info: DeviceInfo,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    handles: Mutex<Handles>,
}

// SAFETY: CUDA driver handles may be used from any thread once the context is current
// on it, which every method does first; the mutable maps are behind a mutex.
unsafe impl Send for CudaDevice {}
// SAFETY: as above.
unsafe impl Sync for CudaDevice {}

impl CudaDevice {
    /// Device `ordinal`, its primary context, and every kernel module compiled for it.
    pub fn open(ordinal: usize) -> Result<Self> {
        let all = devices()?;
        let info = all
            .get(ordinal)
            .cloned()
            .ok_or_else(|| Error::input(format!("cuda: no device {ordinal} ({} present)", all.len())))?;
        let dev = cu::device::get(ordinal as i32).map_err(|e| err("cuDeviceGet", e))?;
        // SAFETY: `dev` came from cuDeviceGet; the retained context is released in Drop.
        let ctx = unsafe { cu::primary_ctx::retain(dev) }.map_err(|e| err("cuDevicePrimaryCtxRetain", e))?;
        let d = CudaDevice {
            info,
            dev,
            ctx,
            handles: Mutex::new(Handles { modules: Vec::new(), funcs: HashMap::new(), registered: Vec::new() }),
        };
        d.current()?;
        let arch = format!("sm_{}{}", d.info.compute.0, d.info.compute.1);
        let mut h = d.handles.lock().unwrap_or_else(|e| e.into_inner());
        for program in source::programs() {
            let ptx = compile_cached(program, &arch)?;
            let image = CString::new(ptx).map_err(|_| Error::model("cuda: PTX with a NUL byte"))?;
            // SAFETY: a NUL-terminated PTX image; the context is current.
            let module = unsafe { cu::module::load_data(image.as_ptr().cast()) }
                .map_err(|e| err(&format!("loading {program} for {arch}"), e))?;
            h.modules.push(module);
        }
        drop(h);
        Ok(d)
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn current(&self) -> Result<()> {
        // SAFETY: the context is retained for the device's life.
        unsafe { cu::ctx::set_current(self.ctx) }.map_err(|e| err("cuCtxSetCurrent", e))
    }

    fn function(&self, name: &str) -> Result<sys::CUfunction> {
        let mut h = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&f) = h.funcs.get(name) {
            return Ok(f);
        }
        let cname = CString::new(name).map_err(|_| Error::model("cuda: bad kernel name"))?;
        for &m in &h.modules {
            // SAFETY: `m` is a loaded module of this context.
            if let Ok(f) = unsafe { cu::module::get_function(m, cname.clone()) } {
                h.funcs.insert(name.to_string(), f);
                return Ok(f);
            }
        }
        Err(Error::model(format!("cuda: no kernel named {name}")))
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        if self.current().is_ok() {
            let h = self.handles.get_mut().unwrap_or_else(|e| e.into_inner());
            for &m in &h.modules {
                // SAFETY: loaded by `open`, unloaded once.
                let _ = unsafe { cu::module::unload(m) };
            }
            for &(start, _) in &h.registered {
                // SAFETY: registered by `map_host`, unregistered once.
                let _ = unsafe { sys::cuMemHostUnregister(start as *mut c_void) };
            }
        }
        // SAFETY: retained by `open`.
        let _ = unsafe { cu::primary_ctx::release(self.dev) };
    }
}

impl Device for CudaDevice {
    fn name(&self) -> String {
        let (a, b) = self.info.compute;
        format!("{}, sm_{a}{b}", self.info.name)
    }

    fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        self.current()?;
        // SAFETY: the context is current; the memory is zeroed before use.
        unsafe {
            let p = cu::malloc_sync(bytes.max(1)).map_err(|e| err(&format!("allocating {bytes} bytes"), e))?;
            cu::memset_d8_sync(p, 0, bytes.max(1)).map_err(|e| err("cuMemsetD8", e))?;
            Ok(p)
        }
    }

    fn free(&self, ptr: DevPtr) {
        if ptr != 0 && self.current().is_ok() {
            // SAFETY: `ptr` came from `alloc` and is freed once (its Buf's drop).
            let _ = unsafe { cu::free_sync(ptr) };
        }
    }

    fn upload(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.current()?;
        // SAFETY: `dst` holds at least `src.len()` bytes (the backend sized it).
        unsafe { cu::memcpy_htod_sync(dst, src) }.map_err(|e| err("copy to the device", e))
    }

    fn download(&self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.current()?;
        // SAFETY: `src` holds at least `dst.len()` bytes; a synchronous copy on the legacy
        // stream waits for the kernels issued before it.
        unsafe { cu::memcpy_dtoh_sync(dst, src) }.map_err(|e| err("copy from the device", e))
    }

    fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        self.current()?;
        // SAFETY: both ranges lie in live allocations (the backend checked the shapes).
        unsafe { cu::memcpy_dtod_async(dst, src, bytes, cu::stream::null()) }.map_err(|e| err("device copy", e))
    }

    fn launch(&self, name: &str, cfg: Launch, args: &[Arg]) -> Result<()> {
        self.current()?;
        let f = self.function(name)?;
        let mut vals: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) => p,
                Arg::U32(v) => u64::from(v),
                Arg::F32(v) => u64::from(v.to_bits()),
            })
            .collect();
        // Each parameter points at its value; 4-byte ones read the low half (little endian).
        let mut params: Vec<*mut c_void> = vals.iter_mut().map(|v| (v as *mut u64).cast()).collect();
        let [gx, gy, gz] = cfg.grid;
        let [bx, by, bz] = cfg.block;
        // SAFETY: `f` is a kernel of a loaded module; `params` matches the kernel's
        // parameter list (the contract of shaders/cuda/README.md) and outlives the call,
        // which copies the values.
        unsafe { cu::launch_kernel(f, (gx, gy, gz), (bx, by, bz), 0, cu::stream::null(), &mut params) }
            .map_err(|e| err(&format!("launching {name}"), e))
    }

    fn sync(&self) -> Result<()> {
        self.current()?;
        cu::ctx::synchronize().map_err(|e| err("a kernel failed", e))
    }

    fn map_host(&self, bytes: &[u8]) -> Result<Option<DevPtr>> {
        // Integrated GPUs only (a discrete one would read over PCIe at every use), and
        // CAIRN_CUDA_ZERO_COPY=0 turns it off.
        let off = std::env::var("CAIRN_CUDA_ZERO_COPY").is_ok_and(|v| v == "0");
        if off || !self.info.integrated || !self.info.host_register || bytes.is_empty() {
            return Ok(None);
        }
        self.current()?;
        let page = 4096usize.max(page_size());
        let start = bytes.as_ptr() as usize / page * page;
        let end = (bytes.as_ptr() as usize + bytes.len()).div_ceil(page) * page;
        let mut h = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        // Register the parts of [start, end) no earlier tensor's range covers.
        let mut gaps = vec![(start, end)];
        for &(a, b) in &h.registered {
            gaps = gaps
                .into_iter()
                .flat_map(|(s, e)| {
                    if b <= s || a >= e {
                        vec![(s, e)]
                    } else {
                        [(s, a.max(s)), (b.min(e), e)].into_iter().filter(|(x, y)| x < y).collect()
                    }
                })
                .collect();
        }
        let flags = sys::CU_MEMHOSTREGISTER_READ_ONLY | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
        for (s, e) in gaps {
            // SAFETY: [s, e) is whole pages of a live read-only mapping (the model file,
            // which outlives the weights); registered once, unregistered in Drop.
            unsafe { sys::cuMemHostRegister_v2(s as *mut c_void, e - s, flags) }
                .result()
                .map_err(|e| err("registering the mapped model", e))?;
            h.registered.push((s, e));
        }
        let mut dptr: sys::CUdeviceptr = 0;
        // SAFETY: the address lies in memory registered above.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dptr, bytes.as_ptr() as *mut c_void, 0) }
            .result()
            .map_err(|e| err("cuMemHostGetDevicePointer", e))?;
        Ok(Some(dptr))
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}
