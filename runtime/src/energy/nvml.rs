//! NVIDIA GPUs through NVML, loaded at run time (`libnvidia-ml.so.1` comes with the
//! driver; nothing is linked at build time, and without it the reader is unavailable
//! with dlopen's reason). `nvmlDeviceGetTotalEnergyConsumption` is the GPU's energy in
//! millijoules since the driver loaded (Volta and later); devices are summed.

use crate::error::{Error, Result};

use super::EnergyReader;

pub struct Nvml {
    #[cfg(unix)]
    inner: ffi::Lib,
    /// Each device's counter at open, in mJ.
    start_mj: Vec<u64>,
}

impl Nvml {
    #[cfg(unix)]
    pub fn open() -> Result<Nvml> {
        let inner = ffi::Lib::load()?;
        let start_mj = inner.energies_mj()?;
        if start_mj.is_empty() {
            return Err(Error::Energy("NVML: no GPU".into()));
        }
        Ok(Nvml { inner, start_mj })
    }

    #[cfg(not(unix))]
    pub fn open() -> Result<Nvml> {
        Err(Error::Energy("NVML: only loaded on Unix-like systems".into()))
    }

    pub fn devices(&self) -> usize {
        self.start_mj.len()
    }
}

impl EnergyReader for Nvml {
    fn name(&self) -> &str {
        "nvml"
    }

    fn read_joules(&mut self) -> Result<f64> {
        #[cfg(unix)]
        {
            let now = self.inner.energies_mj()?;
            Ok(now.iter().zip(&self.start_mj).map(|(n, s)| n.saturating_sub(*s)).sum::<u64>() as f64 * 1e-3)
        }
        #[cfg(not(unix))]
        Err(Error::Energy("NVML: unavailable".into()))
    }
}

#[cfg(unix)]
mod ffi {
    use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr};

    use crate::error::{Error, Result};

    type Ret = c_int;
    type Device = *mut c_void;
    const SUCCESS: Ret = 0;

    /// The library handle and the entry points used, resolved once.
    pub struct Lib {
        handle: *mut c_void,
        get_count: unsafe extern "C" fn(*mut c_uint) -> Ret,
        get_handle: unsafe extern "C" fn(c_uint, *mut Device) -> Ret,
        get_energy: unsafe extern "C" fn(Device, *mut c_ulonglong) -> Ret,
        shutdown: unsafe extern "C" fn() -> Ret,
    }

    // SAFETY: NVML is thread-safe (its documentation: simultaneous calls from several
    // threads are allowed); the handle is only used to close the library on drop.
    unsafe impl Send for Lib {}

    fn dlerror() -> String {
        // SAFETY: dlerror returns null or a NUL-terminated string owned by libc, valid
        // until the next dl* call on this thread; it is copied at once.
        unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "unknown error".into()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        }
    }

    /// dlsym `name` from `handle` as a function pointer type `F`.
    ///
    /// # Safety
    /// `F` must be the symbol's true C signature, an `unsafe extern "C" fn`.
    unsafe fn sym<F: Copy>(handle: *mut c_void, name: &CStr) -> Result<F> {
        // SAFETY: `handle` is a live dlopen handle and `name` NUL-terminated.
        let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
        if p.is_null() {
            return Err(Error::Energy(format!("NVML: no symbol {}: {}", name.to_string_lossy(), dlerror())));
        }
        assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
        // SAFETY: a non-null function address of the signature the caller vouches for;
        // function and data pointers have one size on every platform dlopen exists on.
        Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
    }

    impl Lib {
        pub fn load() -> Result<Lib> {
            let name = c"libnvidia-ml.so.1";
            // SAFETY: a NUL-terminated name; loading the driver's library runs only its
            // own initialisers.
            let handle = unsafe { libc::dlopen(name.as_ptr() as *const c_char, libc::RTLD_NOW | libc::RTLD_LOCAL) };
            if handle.is_null() {
                return Err(Error::Energy(format!("NVML: cannot load libnvidia-ml.so.1: {}", dlerror())));
            }
            // SAFETY: the signatures are those of nvml.h (nvmlReturn_t is a C enum, an
            // int; nvmlDevice_t a pointer).
            let lib = unsafe {
                let init: unsafe extern "C" fn() -> Ret = match sym(handle, c"nvmlInit_v2") {
                    Ok(f) => f,
                    Err(e) => {
                        libc::dlclose(handle);
                        return Err(e);
                    }
                };
                let resolved = (|| {
                    Ok::<_, Error>(Lib {
                        handle,
                        get_count: sym(handle, c"nvmlDeviceGetCount_v2")?,
                        get_handle: sym(handle, c"nvmlDeviceGetHandleByIndex_v2")?,
                        get_energy: sym(handle, c"nvmlDeviceGetTotalEnergyConsumption")?,
                        shutdown: sym(handle, c"nvmlShutdown")?,
                    })
                })();
                let lib = match resolved {
                    Ok(l) => l,
                    Err(e) => {
                        libc::dlclose(handle);
                        return Err(e);
                    }
                };
                let r = init();
                if r != SUCCESS {
                    libc::dlclose(handle);
                    std::mem::forget(lib);
                    return Err(Error::Energy(format!("NVML: nvmlInit_v2 failed (nvmlReturn_t {r})")));
                }
                lib
            };
            Ok(lib)
        }

        /// Every device's total energy, in mJ.
        pub fn energies_mj(&self) -> Result<Vec<u64>> {
            let mut n: c_uint = 0;
            // SAFETY: NVML is initialised; `n` is a valid out-pointer.
            let r = unsafe { (self.get_count)(&mut n) };
            if r != SUCCESS {
                return Err(Error::Energy(format!("NVML: nvmlDeviceGetCount_v2 failed ({r})")));
            }
            (0..n)
                .map(|i| {
                    let mut dev: Device = std::ptr::null_mut();
                    let mut mj: c_ulonglong = 0;
                    // SAFETY: NVML is initialised, `i` < the device count, and both
                    // out-pointers are valid for one write.
                    let r = unsafe {
                        match (self.get_handle)(i, &mut dev) {
                            SUCCESS => (self.get_energy)(dev, &mut mj),
                            r => r,
                        }
                    };
                    if r != SUCCESS {
                        return Err(Error::Energy(format!(
                            "NVML: device {i}: no total energy counter (nvmlReturn_t {r}; Volta or later needed)"
                        )));
                    }
                    Ok(mj)
                })
                .collect()
        }
    }

    impl Drop for Lib {
        fn drop(&mut self) {
            // SAFETY: initialised in `load`; nothing uses NVML after this.
            unsafe {
                (self.shutdown)();
                libc::dlclose(self.handle);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without the NVIDIA driver the reader is unavailable and says why;
    /// with it, the counter never goes backwards.
    #[test]
    fn unavailable_or_monotone() {
        match Nvml::open() {
            Err(e) => {
                let e = e.to_string();
                assert!(e.starts_with("NVML: "), "{e}");
                println!("nvml: {e}");
            }
            Ok(mut r) => {
                let a = r.read_joules().unwrap();
                let b = r.read_joules().unwrap();
                assert!(b >= a && a >= 0.0);
                println!("nvml: {} devices, {b} J since open", r.devices());
            }
        }
    }
}
