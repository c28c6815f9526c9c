//! Embeds the CUDA kernel sources (`shaders/cuda/*.cu`, `*.cuh`): a generated list of
//! `include_str!`s, so adding a kernel file needs no edit here or in the backend.
use std::io::Write;
use std::path::Path;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shaders/cuda");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".cu") || n.ends_with(".cuh"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let out = Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("cuda_sources.rs");
    let mut f = std::fs::File::create(&out).expect("OUT_DIR is writable");
    writeln!(f, "&[").expect("write");
    for n in &names {
        let path = dir.join(n);
        println!("cargo:rerun-if-changed={}", path.display());
        writeln!(f, "    ({n:?}, include_str!({:?})),", path.display().to_string()).expect("write");
    }
    writeln!(f, "]").expect("write");
}
