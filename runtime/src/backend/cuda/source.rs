//! The CUDA kernel sources, embedded at build time, and the splicing of their
//! `#include "x.cuh"` lines: NVRTC gets one self-contained program per `.cu` file
//! (it has no file system view of ours), while the emulator compiles the same files
//! from disk with the include path set.

use crate::error::{Error, Result};

/// `(file name, contents)` of every `.cu` and `.cuh` under `shaders/cuda/`.
pub const SOURCES: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/cuda_sources.rs"));

/// The `.cu` files: one NVRTC program (one module) each.
pub fn programs() -> impl Iterator<Item = &'static str> {
    SOURCES.iter().map(|(n, _)| *n).filter(|n| n.ends_with(".cu"))
}

fn lookup(name: &str) -> Option<&'static str> {
    SOURCES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// The source of `name` with every `#include "…"` of ours spliced in once (each header
/// is its own include guard); other includes are left to the compiler.
pub fn assemble(name: &str) -> Result<String> {
    let mut out = String::new();
    let mut seen = Vec::new();
    splice(name, &mut out, &mut seen, 0)?;
    Ok(out)
}

fn splice(name: &str, out: &mut String, seen: &mut Vec<String>, depth: usize) -> Result<()> {
    if depth > 16 {
        return Err(Error::model(format!("cuda: include cycle at {name}")));
    }
    let src = lookup(name).ok_or_else(|| Error::model(format!("cuda: no kernel source {name}")))?;
    for line in src.lines() {
        let inc = line
            .trim()
            .strip_prefix("#include")
            .map(str::trim)
            .and_then(|r| r.strip_prefix('"'))
            .and_then(|r| r.strip_suffix('"'));
        match inc {
            Some(h) if lookup(h).is_some() => {
                if !seen.iter().any(|s| s == h) {
                    seen.push(h.to_string());
                    splice(h, out, seen, depth + 1)?;
                }
            }
            Some(h) => return Err(Error::model(format!("cuda: {name} includes {h}, which is not in shaders/cuda"))),
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_assembles() {
        for p in programs() {
            let s = assemble(p).unwrap();
            assert!(!s.contains("#include \""), "{p} keeps an include of ours");
        }
    }
}
