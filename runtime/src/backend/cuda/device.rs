//! What the CUDA backend needs of a device: memory, copies and kernel launches by name.
//! Two implementations: the driver through cudarc (feature `cuda`), and the host
//! emulator ([`super::emu`]) that runs the same `.cu` sources compiled as C++, so the
//! backend's arithmetic is tested on machines without a GPU.

use crate::error::Result;

/// A device address (a host address under the emulator).
pub type DevPtr = u64;

/// One kernel argument, passed by value as the kernel declares it: pointers are 8
/// bytes, `unsigned` and `float` 4.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    Ptr(DevPtr),
    U32(u32),
    F32(f32),
}

/// A launch: grid and block sizes (x, y, z). Kernels use static shared memory only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
}

impl Launch {
    /// A 1-D launch of `threads` threads in blocks of `block`.
    pub fn linear(threads: usize, block: u32) -> Self {
        let blocks = threads.div_ceil(block as usize).max(1) as u32;
        Launch { grid: [blocks, 1, 1], block: [block, 1, 1] }
    }

    /// A 2-D grid of blocks of `block` threads.
    pub fn grid2(x: usize, y: usize, block: u32) -> Self {
        Launch { grid: [x.max(1) as u32, y.max(1) as u32, 1], block: [block, 1, 1] }
    }
}

/// A CUDA device (or its emulation). Work is issued in order on one stream; errors of
/// asynchronous work surface at the next [`Device::sync`].
pub trait Device: Send + Sync {
    /// The device's name, as `--backend cuda` reports it.
    fn name(&self) -> String;
    /// `bytes` of zeroed device memory (at least 256-byte aligned).
    fn alloc(&self, bytes: usize) -> Result<DevPtr>;
    /// Give back memory from [`Device::alloc`].
    fn free(&self, ptr: DevPtr);
    /// Host → device.
    fn upload(&self, dst: DevPtr, src: &[u8]) -> Result<()>;
    /// Device → host (waits for the work issued before it).
    fn download(&self, src: DevPtr, dst: &mut [u8]) -> Result<()>;
    /// Device → device, `bytes` from `src` to `dst`.
    fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()>;
    /// Run kernel `name` (an `extern "C" __global__` function of `shaders/cuda/`).
    fn launch(&self, name: &str, cfg: Launch, args: &[Arg]) -> Result<()>;
    /// Wait for every issued operation; report the first error among them.
    fn sync(&self) -> Result<()>;
    /// `bytes` as an address the kernels can read in place, where the device reads host
    /// memory without a copy (an integrated GPU: a Jetson's weights then live once, in
    /// the mapped file); `None` where it cannot. `bytes` must outlive the device's use.
    fn map_host(&self, bytes: &[u8]) -> Result<Option<DevPtr>> {
        let _ = bytes;
        Ok(None)
    }
}
