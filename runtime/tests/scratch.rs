//! The CPU backend's recycled activation buffers: reuse never leaks old contents, what
//! is held stays bounded, and a forward pass leaves nothing held. One test, alone in its
//! binary, because the pool is process-wide.

use cairn::backend::cpu::{scratch, CpuBackend};
use cairn::backend::Backend;

#[test]
fn recycled_buffers_are_clean_bounded_and_released() {
    let big = 1 << 16;
    // A dirty buffer comes back as zeros, and as a copy holds exactly its source.
    scratch::recycle(vec![7.0; big]);
    let held = scratch::held_bytes();
    assert_eq!(held, big * 4);
    let z = scratch::zeroed(big / 2);
    assert_eq!(scratch::held_bytes(), 0, "the free buffer was reused");
    assert!(z.len() == big / 2 && z.iter().all(|&x| x == 0.0));
    scratch::recycle(z);
    let src: Vec<f32> = (0..big / 3).map(|i| i as f32).collect();
    assert_eq!(scratch::copy_of(&src), src);

    // Small buffers are malloc's; growing requests replace what they outgrew.
    scratch::recycle(vec![1.0; 100]);
    assert_eq!(scratch::held_bytes(), 0);
    for step in 1..=64 {
        scratch::recycle(scratch::zeroed(big * step));
        assert!(scratch::held_bytes() <= big * step * 4, "step {step}: {} bytes held", scratch::held_bytes());
    }
    // The cap: many live buffers returned at once are not all kept.
    let live: Vec<Vec<f32>> = (0..4).map(|_| scratch::zeroed(1 << 22)).collect();
    live.into_iter().for_each(scratch::recycle);
    assert!(scratch::held_bytes() <= 32 << 20, "{} bytes held", scratch::held_bytes());

    // A pass through the backend releases everything at its end.
    let be = CpuBackend::new(2).unwrap();
    let x = be.scope(|| {
        let a = be.upload(&vec![0.5; big * 2], 2, big);
        let b = be.rows(&a, 1, 1);
        drop(a);
        be.to_host(b)
    });
    assert_eq!(x, vec![0.5; big]);
    assert_eq!(scratch::held_bytes(), 0);
}
