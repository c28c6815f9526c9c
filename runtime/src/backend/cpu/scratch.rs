//! Recycled activation buffers.
//!
//! A prefill chunk allocates and frees the same few multi-megabyte buffers in every
//! layer (a feed-forward's gate, up and output; attention's transposed keys and output).
//! Through glibc these are mapped, faulted in and zeroed by the kernel, and unmapped
//! again, each unmap a TLB shootdown on every other core: a third of a 2-thread prefill
//! went to the kernel. Returned here instead, they stay resident at the working set's
//! size and are reused by the next layer. Small buffers are left to malloc, whose bins
//! serve them well; what the pool holds is capped, and it is emptied after every
//! forward pass ([`trim`]), so that between passes nothing is held beyond what a memory
//! budget counts.

use std::sync::Mutex;

/// Buffers shorter than this (in floats, 64 KiB) are malloc's.
const MIN_LEN: usize = 1 << 14;
/// Buffers longer than this (64 MiB) are never held.
const MAX_LEN: usize = 1 << 24;
/// The most bytes the pool holds while they wait for reuse.
const MAX_HELD: usize = 32 << 20;

struct Pool {
    free: Vec<Vec<f32>>,
    held: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool { free: Vec::new(), held: 0 });

/// `len` zeros, in a recycled buffer where one is free.
pub fn zeroed(len: usize) -> Vec<f32> {
    match take(len) {
        Some(mut v) => {
            v.resize(len, 0.0);
            v
        }
        None => vec![0f32; len],
    }
}

/// A copy of `src`, in a recycled buffer where one is free.
pub fn copy_of(src: &[f32]) -> Vec<f32> {
    match take(src.len()) {
        Some(mut v) => {
            v.extend_from_slice(src);
            v
        }
        None => src.to_vec(),
    }
}

/// The smallest free buffer that holds `len` floats, emptied. On a miss the largest
/// smaller one is released: requests that grow (attention's score rows along a prompt)
/// replace their predecessors instead of piling up beside them.
fn take(len: usize) -> Option<Vec<f32>> {
    if len < MIN_LEN {
        return None;
    }
    let mut pool = POOL.lock().ok()?;
    let fit = pool.free.iter().enumerate().filter(|(_, v)| v.capacity() >= len).min_by_key(|(_, v)| v.capacity());
    let (i, hit) = match fit {
        Some((i, _)) => (i, true),
        None => (pool.free.iter().enumerate().max_by_key(|(_, v)| v.capacity())?.0, false),
    };
    let mut v = pool.free.swap_remove(i);
    pool.held -= v.capacity() * 4;
    drop(pool);
    if !hit {
        return None;
    }
    v.clear();
    Some(v)
}

/// Give `v` back for reuse (or to the system, past the pool's limits).
pub fn recycle(v: Vec<f32>) {
    let bytes = v.capacity() * 4;
    if !(MIN_LEN..=MAX_LEN).contains(&v.capacity()) {
        return;
    }
    if let Ok(mut pool) = POOL.lock() {
        if pool.held + bytes <= MAX_HELD {
            pool.held += bytes;
            pool.free.push(v);
        }
    }
}

/// Release every held buffer.
pub fn trim() {
    let free = match POOL.lock() {
        Ok(mut pool) => {
            pool.held = 0;
            std::mem::take(&mut pool.free)
        }
        Err(_) => return,
    };
    drop(free);
}

/// Bytes the pool holds now.
pub fn held_bytes() -> usize {
    POOL.lock().map_or(0, |p| p.held)
}
