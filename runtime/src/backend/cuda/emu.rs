//! The host emulator of the CUDA kernels (see `shaders/cuda/emu/`): the same `.cu`
//! sources compiled by g++ against an emulation header into a shared library, loaded
//! with `dlopen`, behind the [`Device`] trait. Device memory is host memory (a device
//! pointer is a host address), and a launch runs to completion before it returns, so
//! the backend's arithmetic is tested on machines without a GPU.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use super::device::{Arg, DevPtr, Device, Launch};
use crate::error::{Error, Result};

/// `cairn_emu_launch` of `shaders/cuda/emu/cuda_emu.cpp`.
type LaunchFn = unsafe extern "C" fn(*const c_char, *const c_uint, *const c_uint, *mut *mut c_void) -> c_int;
/// `cairn_emu_arity`.
type ArityFn = unsafe extern "C" fn(*const c_char) -> c_int;

/// Alignment of every allocation (the driver gives at least 256 bytes too).
const ALIGN: usize = 256;

/// The kernel sources: `shaders/cuda/` of this repository.
pub fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shaders/cuda")
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.to_path_buf(), source }
}

/// Every file the library is built from, `.cu` files first (they are the translation
/// units), then the headers and the runtime.
fn sources(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut units = Vec::new();
    let mut rest = vec![dir.join("emu/cuda_emu.h"), dir.join("emu/cuda_emu.cpp")];
    for e in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let p = e.map_err(|e| io_err(dir, e))?.path();
        match p.extension().and_then(|x| x.to_str()) {
            Some("cu") => units.push(p),
            Some("cuh") => rest.push(p),
            _ => {}
        }
    }
    units.sort();
    if units.is_empty() {
        return Err(Error::model(format!("no .cu kernels in {}", dir.display())));
    }
    Ok((units, rest))
}

fn modified(p: &Path) -> Result<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).map_err(|e| io_err(p, e))
}

/// Compile the emulator library from `shaders/cuda/` with g++ into `out_dir`, unless a
/// library there is newer than every source. Returns its path. Several processes may
/// build at once: each writes its own file and renames it into place.
pub fn build(out_dir: &Path) -> Result<PathBuf> {
    // One build at a time in this process: tests open the emulator from several threads
    // at once, and two builds would share the temporary file below (a rename of one
    // then found the other's output gone).
    static BUILDING: Mutex<()> = Mutex::new(());
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = source_dir();
    let (units, rest) = sources(&dir)?;
    let lib = out_dir.join("libcairn_cuda_emu.so");
    if let Ok(built) = modified(&lib) {
        let mut fresh = true;
        for s in units.iter().chain(&rest) {
            fresh &= modified(s)? <= built;
        }
        if fresh {
            return Ok(lib);
        }
    }
    std::fs::create_dir_all(out_dir).map_err(|e| io_err(out_dir, e))?;
    let tmp = out_dir.join(format!("libcairn_cuda_emu.{}.so.tmp", std::process::id()));
    let out = std::process::Command::new("g++")
        .args(["-std=c++17", "-O2", "-fPIC", "-shared", "-pthread", "-include"])
        .arg(dir.join("emu/cuda_emu.h"))
        .args(["-x", "c++"])
        .args(&units)
        .arg(dir.join("emu/cuda_emu.cpp"))
        .arg("-o")
        .arg(&tmp)
        .output()
        .map_err(|e| Error::model(format!("cannot run g++ to build the CUDA emulator: {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::model(format!(
            "g++ failed to build the CUDA emulator:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    std::fs::rename(&tmp, &lib).map_err(|e| io_err(&lib, e))?;
    Ok(lib)
}

/// The emulator as a [`Device`].
pub struct EmuDevice {
    launch: LaunchFn,
    arity: ArityFn,
    /// Live allocations: base address → size.
    allocs: Mutex<BTreeMap<u64, usize>>,
}

fn dl_error(what: &str) -> Error {
    // SAFETY: dlerror returns null or a NUL-terminated string valid until the next dl call
    // on this thread; it is copied at once.
    let msg = unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            String::from("unknown error")
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    };
    Error::model(format!("{what}: {msg}"))
}

impl EmuDevice {
    /// Build the library into `out_dir` (see [`build`]) and load it.
    pub fn new(out_dir: &Path) -> Result<EmuDevice> {
        EmuDevice::open(&build(out_dir)?)
    }

    /// Load a library made by [`build`]. It is never unloaded: its thread pool lives
    /// for the rest of the process.
    pub fn open(lib: &Path) -> Result<EmuDevice> {
        let path = CString::new(lib.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::model(format!("library path {} holds a NUL byte", lib.display())))?;
        // SAFETY: `path` is a valid C string; the library's static initializers only fill
        // its kernel table.
        let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(dl_error(&format!("cannot load {}", lib.display())));
        }
        let sym = |name: &CStr| {
            // SAFETY: `handle` is a live library handle (never closed) and `name` a C string.
            let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
            if p.is_null() {
                Err(dl_error(&format!("{} has no {}", lib.display(), name.to_string_lossy())))
            } else {
                Ok(p)
            }
        };
        let (launch, arity) = (sym(c"cairn_emu_launch")?, sym(c"cairn_emu_arity")?);
        // SAFETY: both symbols are the `extern "C"` functions of cuda_emu.cpp with exactly
        // these signatures.
        let (launch, arity) = unsafe {
            (std::mem::transmute::<*mut c_void, LaunchFn>(launch), std::mem::transmute::<*mut c_void, ArityFn>(arity))
        };
        Ok(EmuDevice { launch, arity, allocs: Mutex::new(BTreeMap::new()) })
    }

    /// The number of parameters of kernel `name`, or `None` when the library lacks it.
    pub fn kernel_arity(&self, name: &str) -> Option<usize> {
        let c = CString::new(name).ok()?;
        // SAFETY: `c` is a valid C string; the function only looks it up.
        let n = unsafe { (self.arity)(c.as_ptr()) };
        usize::try_from(n).ok()
    }

    /// The allocation holding `[ptr, ptr + len)`, or an error naming `what`.
    fn check(&self, ptr: DevPtr, len: usize, what: &str) -> Result<()> {
        let allocs = self.allocs.lock().unwrap_or_else(|e| e.into_inner());
        match allocs.range(..=ptr).next_back() {
            Some((&base, &size)) if ptr.checked_add(len as u64).is_some_and(|end| end <= base + size as u64) => Ok(()),
            _ => Err(Error::model(format!("{what}: {len} bytes at {ptr:#x} are not inside one device allocation"))),
        }
    }
}

impl Device for EmuDevice {
    fn name(&self) -> String {
        "CUDA emulator (host)".into()
    }

    fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        let layout = std::alloc::Layout::from_size_align(bytes.max(1), ALIGN)
            .map_err(|_| Error::model(format!("cannot allocate {bytes} bytes")))?;
        // SAFETY: the layout has a nonzero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        if p.is_null() {
            return Err(Error::model(format!("out of host memory allocating {bytes} bytes")));
        }
        self.allocs.lock().unwrap_or_else(|e| e.into_inner()).insert(p as u64, bytes.max(1));
        Ok(p as u64)
    }

    fn free(&self, ptr: DevPtr) {
        let size = self.allocs.lock().unwrap_or_else(|e| e.into_inner()).remove(&ptr);
        if let Some(size) = size {
            // SAFETY: `ptr` came from `alloc` with this size and alignment (the map says
            // so) and was removed from the map, so it is freed once.
            unsafe {
                std::alloc::dealloc(ptr as *mut u8, std::alloc::Layout::from_size_align_unchecked(size, ALIGN));
            }
        }
    }

    fn upload(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.check(dst, src.len(), "upload")?;
        // SAFETY: the destination range lies inside a live allocation (checked above),
        // which cannot overlap the host slice.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn download(&self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        self.check(src, dst.len(), "download")?;
        // SAFETY: the source range lies inside a live allocation (checked above).
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        self.check(src, bytes, "copy source")?;
        self.check(dst, bytes, "copy destination")?;
        // SAFETY: both ranges lie inside live allocations (checked above); they may overlap.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    fn launch(&self, name: &str, cfg: Launch, args: &[Arg]) -> Result<()> {
        // The kernel reads exactly its parameters' slots: a short list would be read past.
        match self.kernel_arity(name) {
            None => return Err(Error::model(format!("the CUDA emulator has no kernel {name}"))),
            Some(n) if n != args.len() => {
                return Err(Error::model(format!("kernel {name} takes {n} arguments, {} given", args.len())))
            }
            Some(_) => {}
        }
        // Every pointer must point into live memory: a stale one would crash the process.
        for a in args {
            if let Arg::Ptr(p) = *a {
                self.check(p, 0, &format!("kernel {name}: argument"))?;
            }
        }
        // Each argument's value in its own 8-byte slot, its bytes first (as the kernel
        // reads a 4-byte `unsigned` or `float` at the slot's address).
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| {
                let mut b = [0u8; 8];
                match *a {
                    Arg::Ptr(p) => b = p.to_ne_bytes(),
                    Arg::U32(v) => b[..4].copy_from_slice(&v.to_ne_bytes()),
                    Arg::F32(v) => b[..4].copy_from_slice(&v.to_ne_bytes()),
                }
                u64::from_ne_bytes(b)
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        let kernel = CString::new(name).map_err(|_| Error::model(format!("kernel name {name:?} holds a NUL byte")))?;
        // SAFETY: grid and block are 3 values each, `ptrs` points at live slots holding
        // the arguments, and every pointer argument was checked to be device memory. The
        // kernel's own accesses are trusted as on the GPU.
        let rc = unsafe { (self.launch)(kernel.as_ptr(), cfg.grid.as_ptr(), cfg.block.as_ptr(), ptrs.as_mut_ptr()) };
        match rc {
            0 => Ok(()),
            -1 => Err(Error::model(format!("the CUDA emulator has no kernel {name}"))),
            _ => Err(Error::model(format!("kernel {name}: bad launch configuration {cfg:?}"))),
        }
    }

    fn sync(&self) -> Result<()> {
        // Launches run to completion before they return.
        Ok(())
    }
}

impl Drop for EmuDevice {
    fn drop(&mut self) {
        let ptrs: Vec<u64> = self.allocs.lock().unwrap_or_else(|e| e.into_inner()).keys().copied().collect();
        for p in ptrs {
            self.free(p);
        }
    }
}
